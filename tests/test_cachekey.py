"""Caches key on the code and the data: one line of smoe_lab/moe.py or one byte of the corpus changes every key
that depends on it, and the pipeline, the pretrain skip, calibration and reduction re-run."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from smoe_lab import cachekey, checkpoint, experiments, paths
from smoe_lab.data.corpus import open_corpus, prepare


@pytest.fixture(scope="module")
def data_copy(tmp_path_factory):
    """A private copy of the prepared tiny corpus (tests may edit it) under its own SMOE_LAB_DATA folder."""
    src = Path(prepare("tiny"))
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(src, root / "prepared" / "tiny")
    (root / "cache").symlink_to(paths.cache_dir(), target_is_directory=True)  # the downloaded wheels (read only)
    return root


@pytest.fixture
def private_data(data_copy, monkeypatch):
    monkeypatch.setenv("SMOE_LAB_DATA", str(data_copy))
    return data_copy / "prepared" / "tiny"


def edit_source(tmp_path, monkeypatch) -> Path:
    """Point the source hash at a copy of the package with one line of moe.py changed."""
    copy = tmp_path / "pkg" / "smoe_lab"
    shutil.copytree(cachekey.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    moe = copy / "moe.py"
    lines = moe.read_text().splitlines(keepends=True)
    lines.insert(1, "# one changed line\n")
    moe.write_text("".join(lines))
    monkeypatch.setattr(cachekey, "SOURCE_DIR", copy)
    return copy


def test_source_hash_sees_one_line_of_moe_py(tmp_path, monkeypatch):
    before = cachekey.source_hash()
    k = cachekey.key("x", a=1)
    edit_source(tmp_path, monkeypatch)
    assert cachekey.source_hash() != before and cachekey.key("x", a=1) != k
    monkeypatch.undo()
    assert cachekey.source_hash() == before


def test_data_keys_follow_content_not_names(tmp_path, private_data):
    twin = tmp_path / "renamed"
    shutil.copytree(private_data, twin)
    assert cachekey.corpus_hash(twin) == cachekey.corpus_hash(private_data)  # same content, another name
    news = twin / "heldout" / "news.jsonl"
    news.write_text(news.read_text() + '{"text": "one more document"}\n')
    assert cachekey.corpus_hash(twin) != cachekey.corpus_hash(private_data)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cachekey.data_hash(tmp_path / "nope")


def _fake_papermill(monkeypatch, calls):
    import papermill

    def execute(src, dst, parameters=None, **kw):
        calls.append(Path(src).stem)
        Path(dst).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", execute)


def test_pipeline_reexecutes_after_a_code_or_data_change(tmp_path, private_data, monkeypatch):
    from smoe_lab.pipeline import run_pipeline

    calls: list[str] = []
    _fake_papermill(monkeypatch, calls)
    out = tmp_path / "ci"
    run_pipeline("ci", out_dir=str(out), log=lambda s: None)
    every = list(calls)
    assert every[:2] == ["01_pretrain", "02_clusters"] and len(every) == 5
    calls.clear()
    run_pipeline("ci", out_dir=str(out), log=lambda s: None)
    assert calls == []  # up to date
    edit_source(tmp_path, monkeypatch)
    run_pipeline("ci", out_dir=str(out), log=lambda s: None)
    assert calls == every  # one line of moe.py: everything again
    calls.clear()
    news = private_data / "heldout" / "news.jsonl"
    news.write_text(news.read_text() + '{"text": "one more document"}\n')
    run_pipeline("ci", out_dir=str(out), log=lambda s: None)
    assert calls == every  # the corpus's content changed (notebook 01 names it): everything again


def test_a_pipeline_killed_inside_a_notebook_resumes_from_that_notebook(tmp_path, private_data, monkeypatch):
    """`smoe-lab run --force` in a child process killed -9 inside notebook 02: the next run starts at 02."""
    import papermill

    from smoe_lab.pipeline import run_pipeline

    calls: list[str] = []
    _fake_papermill(monkeypatch, calls)
    out = tmp_path / "ci"
    run_pipeline("ci", out_dir=str(out), log=lambda s: None)  # everything stamped
    calls.clear()
    pid = os.fork()
    if pid == 0:  # the child (a forked process: the imports are shared): dies inside 02_clusters
        try:

            def execute(src, dst, parameters=None, **kw):
                calls.append(Path(src).stem)
                Path(dst).write_text("partial")
                if Path(src).stem == "02_clusters":
                    os.kill(os.getpid(), signal.SIGKILL)
                Path(dst).write_text("{}")

            papermill.execute_notebook = execute
            run_pipeline("ci", out_dir=str(out), force=True, log=lambda s: None)
        finally:
            os._exit(3)  # not reached when the kill works
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert (out / "02_clusters.ipynb").read_text() == "partial"
    run_pipeline("ci", out_dir=str(out), log=lambda s: None)
    assert calls == ["02_clusters", "03_pruning", "04_results", "05_replication"]  # 01 is up to date


@pytest.fixture
def moe_ckpt(tmp_path, private_data):
    from smoe_lab.config import ModelConfig
    from smoe_lab.model import GPT

    cfg = ModelConfig.preset("tiny", n_layer=2, d_model=32, n_head=2, d_ff=64, num_experts=4)
    path = tmp_path / "pretrain" / "4e-s0" / "checkpoint"
    checkpoint.save(GPT(cfg, seed=0), path, tokenizer=open_corpus(private_data).tokenizer, corpus=str(private_data))
    return path


def test_calibration_and_reduction_caches_key_on_code_and_content(tmp_path, moe_ckpt, monkeypatch):
    def artifact(**kw):
        args = dict(max_examples=8, batch_size=4, seed=0, corpus="tiny")
        return experiments.calibration_artifact(moe_ckpt, "boolq", "train", tmp_path, **{**args, **kw})

    cal, path = artifact()
    created = cal.manifest["created"], path.stat().st_mtime_ns
    assert artifact()[0].manifest["created"] == created[0] and path.stat().st_mtime_ns == created[1]  # reused
    assert artifact(batch_size=2)[0].manifest["batch_size"] == 2  # another batch size: calibrated again
    cal, path = artifact()
    red, _ = experiments.reduced_checkpoint(moe_ckpt, cal, path, "uncurl", 2, tmp_path, "reinit", 0, 1)
    made = (red / checkpoint.WEIGHTS).stat().st_mtime_ns
    assert experiments.reduced_checkpoint(moe_ckpt, cal, path, "uncurl", 2, tmp_path, "reinit", 0, 1)[0] == red
    assert (red / checkpoint.WEIGHTS).stat().st_mtime_ns == made  # reused
    key = cal.manifest["cache_key"]
    edit_source(tmp_path, monkeypatch)
    cal2, path2 = artifact()
    assert cal2.manifest["cache_key"] != key  # the code changed: calibrated again
    experiments.reduced_checkpoint(moe_ckpt, cal2, path2, "uncurl", 2, tmp_path, "reinit", 0, 1)
    assert (red / checkpoint.WEIGHTS).stat().st_mtime_ns != made  # and reduced again


def test_corpus_text_calibration_without_a_corpus_is_an_error(moe_ckpt):
    with pytest.raises(ValueError, match="reads corpus text: pass corpus"):
        experiments.calibration_batches_for(moe_ckpt, "corpus:val_news", "train", None, 4)


def test_pretrain_skip_keys_on_code_and_corpus_content(tmp_path, private_data, monkeypatch):
    from smoe_lab.config import ModelConfig, TrainConfig
    from smoe_lab.train import pretrain

    mcfg = ModelConfig.preset("tiny", n_layer=2, d_model=32, n_head=2, d_ff=64, num_experts=2)
    tcfg = TrainConfig(max_steps=2, batch_size=2, micro_batch_size=2, warmup_steps=0, eval_every=0)
    run = tmp_path / "run"
    pretrain(mcfg, tcfg, private_data, run, progress=False)
    assert experiments._finished(run, mcfg, tcfg, str(private_data))
    assert not experiments._finished(run, mcfg, tcfg.replace(seed=1), str(private_data))
    edit_source(tmp_path, monkeypatch)
    assert not experiments._finished(run, mcfg, tcfg, str(private_data))  # one line of moe.py
    monkeypatch.setattr(cachekey, "SOURCE_DIR", paths.PACKAGE_DIR)
    assert experiments._finished(run, mcfg, tcfg, str(private_data))
    wiki = private_data / "heldout" / "wiki.jsonl"
    wiki.write_text(wiki.read_text() + json.dumps({"text": "x"}) + "\n")
    assert not experiments._finished(run, mcfg, tcfg, str(private_data))  # the corpus's content
