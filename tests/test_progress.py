"""Progress lines of batch runs (smoe_lab.progress): on the terminal when the pipeline asks, silent otherwise."""

import re

from smoe_lab import progress


def test_silent_unless_the_pipeline_asks(monkeypatch, capfd):
    monkeypatch.delenv(progress.ENV, raising=False)
    progress.report("nothing")
    with progress.stage("quiet"):
        pass
    assert capfd.readouterr().err == ""


def test_lines_carry_time_elapsed_and_notebook(monkeypatch, capfd):
    monkeypatch.setenv(progress.ENV, "1")
    monkeypatch.setenv(progress.ENV_T0, "0")
    monkeypatch.setenv(progress.ENV_NOTEBOOK, "01_pretrain")
    with progress.stage("pretrain 8e"):
        pass
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 2
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d \+\d+s\] 01_pretrain: pretrain 8e \.\.\.", err[0])
    assert re.fullmatch(r"\[.*\] 01_pretrain: pretrain 8e: done in \d+\.\ds", err[1])


def test_ticker_throttles(monkeypatch, capfd):
    monkeypatch.setenv(progress.ENV, "1")
    monkeypatch.delenv(progress.ENV_T0, raising=False)
    monkeypatch.delenv(progress.ENV_NOTEBOOK, raising=False)
    t = progress.Ticker("train", total=100, every=3600)
    for i in range(1, 101):
        t.tick(i, "loss 1.0")
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and re.fullmatch(r"\[\d\d:\d\d:\d\d\] train: 100/100 \(loss 1\.0\), \d+s", err[0])


def test_pipeline_kernel_env_is_set_and_restored(monkeypatch):
    import os

    from smoe_lab import pipeline

    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "123")  # the caller's own setting wins
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with pipeline._progress_env("02_clusters", 100.0):
        assert os.environ[progress.ENV] == "1" and os.environ[progress.ENV_NOTEBOOK] == "02_clusters"
        assert float(os.environ[progress.ENV_T0]) == 100.0
        assert os.environ["MALLOC_TOP_PAD_"] == "123"
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == pipeline.MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]
    assert progress.ENV not in os.environ and "MALLOC_TRIM_THRESHOLD_" not in os.environ
    assert os.environ["MALLOC_TOP_PAD_"] == "123"
