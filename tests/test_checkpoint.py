import json

import pytest
import torch

from smoe_lab import checkpoint
from smoe_lab.model import GPT


def test_roundtrip_same_outputs(tmp_path, tiny_cfg):
    m = GPT(tiny_cfg.replace(n_layer=4, num_experts=[4, 2]), seed=0).eval()
    checkpoint.save(m, tmp_path / "ck", step=7)
    m2 = checkpoint.load(tmp_path / "ck")
    idx = torch.randint(0, 97, (2, 16))
    assert torch.equal(m(idx), m2(idx))
    assert m2.config == m.config and m2.checkpoint_meta["step"] == 7
    assert torch.equal(m2.lm_head.weight, m2.transformer.wte.weight)  # tie survives
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model_config"]["num_experts"] == [4, 2]


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, tiny_cfg, monkeypatch):
    m = GPT(tiny_cfg, seed=0)
    checkpoint.save(m, tmp_path / "ck", step=1)
    before = checkpoint.checkpoint_hash(tmp_path / "ck")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", boom)
    with pytest.raises(OSError):
        checkpoint.save(GPT(tiny_cfg, seed=1), tmp_path / "ck", train_state={"x": torch.zeros(1)}, step=2)
    assert checkpoint.checkpoint_hash(tmp_path / "ck") == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp folder left behind


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a smoe_lab checkpoint"):
        checkpoint.load(tmp_path / "nope")


def test_model_hash_tracks_weights(tiny_cfg):
    a, b = GPT(tiny_cfg, seed=0), GPT(tiny_cfg, seed=0)
    assert checkpoint.model_hash(a) == checkpoint.model_hash(b)
    with torch.no_grad():
        b.transformer.wte.weight[0, 0] += 1
    assert checkpoint.model_hash(a) != checkpoint.model_hash(b)
