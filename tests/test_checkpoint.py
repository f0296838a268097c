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


def test_replacing_never_leaves_nothing_and_the_next_load_recovers(tmp_path, tiny_cfg, monkeypatch):
    """A crash after the old checkpoint was moved aside and before the new one landed: the path is empty for a
    moment, and the next read restores the old (complete) checkpoint."""
    from smoe_lab import faults

    old, new = GPT(tiny_cfg, seed=0), GPT(tiny_cfg, seed=1)
    checkpoint.save(old, tmp_path / "ck", step=1)
    before = checkpoint.checkpoint_hash(tmp_path / "ck")

    class Killed(BaseException):  # like SIGKILL: nothing below the hook runs
        pass

    def die(point):
        if point == "save-swapped":
            raise Killed

    monkeypatch.setattr(faults, "hit", die)
    with pytest.raises(Killed):
        checkpoint.save(new, tmp_path / "ck", step=2)
    assert not (tmp_path / "ck").exists() and (tmp_path / ".ck.old").is_dir()
    monkeypatch.undo()
    assert checkpoint.read_config(tmp_path / "ck")[1]["step"] == 1  # recovered on the next read
    assert checkpoint.checkpoint_hash(tmp_path / "ck") == before and not (tmp_path / ".ck.old").exists()
    checkpoint.save(new, tmp_path / "ck", step=2)  # and a later save replaces it normally
    assert checkpoint.read_config(tmp_path / "ck")[1]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_killed_writer_leaves_a_temp_folder_that_the_next_save_removes(tmp_path, tiny_cfg, monkeypatch):
    from smoe_lab import faults

    checkpoint.save(GPT(tiny_cfg, seed=0), tmp_path / "ck", step=1)

    class Killed(BaseException):
        pass

    monkeypatch.setattr(faults, "hit", lambda point: (_ for _ in ()).throw(Killed()) if point == "save-written" else 0)
    with pytest.raises(Killed):
        checkpoint.save(GPT(tiny_cfg, seed=1), tmp_path / "ck", step=2)
    monkeypatch.undo()
    assert checkpoint.read_config(tmp_path / "ck")[1]["step"] == 1  # untouched
    assert any(p.name.startswith(".ck.tmp-") for p in tmp_path.iterdir())
    checkpoint.save(GPT(tiny_cfg, seed=1), tmp_path / "ck", step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_files_and_folders_are_fsynced_before_the_rename(tmp_path, tiny_cfg, monkeypatch):
    import os

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    checkpoint.save(GPT(tiny_cfg), tmp_path / "ck", train_state={"x": torch.zeros(1)}, step=1)
    names = {os.path.basename(p) for p in synced}
    assert {checkpoint.WEIGHTS, checkpoint.CONFIG, checkpoint.TRAIN_STATE} <= names
    assert str(tmp_path) in synced  # the parent folder, after the rename


@pytest.mark.parametrize("part", ["weights", "config", "train_state", "tokenizer", "shape"])
def test_a_corrupted_file_is_one_error_naming_it(tmp_path, tiny_cfg, part):
    from smoe_lab.data.tokenizer import ByteBPETokenizer

    tok = ByteBPETokenizer.train(["a b c d e f g h"] * 20, vocab_size=280)
    m = GPT(tiny_cfg.replace(vocab_size=280))
    ck = checkpoint.save(m, tmp_path / "ck", train_state={"step": 1}, tokenizer=tok, step=1)
    target = {
        "weights": ck / checkpoint.WEIGHTS,
        "config": ck / checkpoint.CONFIG,
        "train_state": ck / checkpoint.TRAIN_STATE,
        "tokenizer": next((ck / checkpoint.TOKENIZER).glob("*.json")),
    }.get(part)
    if part == "shape":  # a config whose shapes disagree with the weights
        doc = json.loads((ck / checkpoint.CONFIG).read_text())
        doc["model_config"]["d_ff"] = 96
        (ck / checkpoint.CONFIG).write_text(json.dumps(doc))
        target = ck / checkpoint.WEIGHTS
    else:
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])  # truncated
    readers = {
        "train_state": checkpoint.load_train_state,
        "tokenizer": checkpoint.load_tokenizer,
    }
    with pytest.raises(ValueError) as err:
        readers.get(part, checkpoint.load)(ck)
    assert str(target) in str(err.value) or target.name in str(err.value)
    assert "\n" not in str(err.value)


def test_train_state_keeps_the_cuda_rng_when_cuda_is_there(tmp_path, tiny_cfg, monkeypatch):
    """The native loop saves every CUDA device's RNG state and restores it on resume (faked CUDA on CPU)."""
    from smoe_lab.config import TrainConfig
    from smoe_lab.data.corpus import get_batch
    from smoe_lab.train import fit

    fake = {"state": [torch.tensor([1, 2, 3], dtype=torch.uint8)], "restored": None}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: fake["state"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: fake.update(restored=s))
    tokens = torch.randint(0, 97, (2048,)).numpy()
    gen = torch.Generator().manual_seed(0)

    def batch():
        x, y = get_batch(tokens, 2, 16, gen)
        return x, y, None

    cfg = TrainConfig(max_steps=2, batch_size=2, micro_batch_size=2, warmup_steps=0, device="cpu", eval_every=0)
    fit(GPT(tiny_cfg), cfg, batch, tmp_path, gen, progress=False)
    state = checkpoint.load_train_state(tmp_path / "checkpoint")
    assert torch.equal(state["cuda_rng"][0], fake["state"][0])
    fit(GPT(tiny_cfg), cfg.replace(max_steps=3), batch, tmp_path, gen, resume=True, progress=False)
    assert fake["restored"] is not None and torch.equal(fake["restored"][0], fake["state"][0])
