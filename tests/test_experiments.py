"""Notebook-level drivers: parallel workers are an execution detail, not a different experiment."""

import pandas as pd

from smoe_lab import experiments
from smoe_lab.notebook_params import PretrainNotebook

TINY = {"n_layer": 2, "d_model": 32, "n_head": 2, "d_ff": 64}


def _params(out_dir, workers):
    return PretrainNotebook.from_dict(
        {
            "model_overrides": TINY, "variants": [1, 4, 8], "tokens": 4096, "batch_size": 8, "micro_batch_size": 8,
            "warmup_steps": 2, "eval_every": 4, "eval_batches": 2, "out_dir": str(out_dir), "progress": False,
            "workers": workers,
        }
    )  # fmt: skip


def test_parallel_pretraining_equals_sequential(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread in both runs: the same float rounding
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = experiments.pretrain_variants(_params(tmp_path / "seq", 1))
        par = experiments.pretrain_variants(_params(tmp_path / "par", 2))  # 3 variants, 2 spawned processes
    finally:
        torch.set_num_threads(threads)
    cols = ["model", "params", "steps", "tokens", "train_loss", "val_loss"]
    pd.testing.assert_frame_equal(seq[cols], par[cols])
    assert list(par["model"]) == ["dense", "4e", "8e"]  # the table keeps the variants' order
    again = experiments.pretrain_variants(_params(tmp_path / "par", 2))  # finished runs are reused, not retrained
    pd.testing.assert_frame_equal(par[cols], again[cols])
