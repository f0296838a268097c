import json
import random

import numpy as np
import pytest
import torch

import smoe_lab.finetune as ft
from smoe_lab import checkpoint
from smoe_lab.config import ModelConfig, TrainConfig
from smoe_lab.data.tasks import Example, TaskBatches, encode_for_training
from smoe_lab.data.tokenizer import ByteBPETokenizer
from smoe_lab.evaluate import chance_baseline, evaluate_task
from smoe_lab.finetune import FinetuneConfig, MixedBatches, finetune, router_warmup
from smoe_lab.model import GPT
from smoe_lab.train import read_metrics

ANIMALS = "cat dog horse sheep goat mouse tiger lion whale otter camel zebra".split()
TOOLS = "hammer saw drill chisel wrench spanner pliers shovel rake ladder needle axe".split()


def animal_task(n: int, seed: int) -> list[Example]:
    """A learnable text-to-text task in the SuperGLUE format: is the word an animal? " Yes" / " No"."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        w = r.choice(ANIMALS + TOOLS)
        out.append(Example("animal", i, f"Is it an animal? {w}", [" No", " Yes"], int(w in ANIMALS)))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning makes a step
    ~100x slower; run these tests single-threaded and restore the suite's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return ByteBPETokenizer.train([e.input + e.target for e in animal_task(200, 5)], vocab_size=300)


def _model(tok, **kw):
    shape = dict(n_layer=2, d_model=64, n_head=2, d_ff=128, vocab_size=tok.vocab_size, block_size=32)
    cfg = ModelConfig.preset("tiny", **{**shape, **kw})
    return GPT(cfg, seed=0)


def _cfg(**kw):
    base = dict(batch_size=16, micro_batch_size=16, lr=3e-3, warmup_steps=10, weight_decay=0.0, device="cpu")
    return FinetuneConfig(**{**base, "dtype": "float32", **kw})


def test_config_validation_and_paper_values():
    p = FinetuneConfig.paper()
    assert (p.lr, p.warmup_steps, p.epochs, p.weight_decay, p.batch_size, p.block_size) == (
        1e-6,
        500,
        50,
        1e-3,
        64,
        256,
    )
    assert (p.eps, p.beta1, p.beta2, p.grad_clip, p.stage, p.mix_ratio) == (1e-8, 0.9, 0.95, 1.0, "stage2", 0.0)
    assert FinetuneConfig.paper("stage1").mix_ratio > 0
    assert p.total_steps(250) == 196  # ceil(50 * 250 / 64)
    assert FinetuneConfig(steps=7).total_steps(10_000) == 7
    for bad, field in [
        (dict(stage="stage3"), "stage"),
        (dict(batch_size=10, micro_batch_size=4), "batch_size"),
        (dict(mix_ratio=0.2), "mix_ratio"),  # stage2 has no pretraining mix
        (dict(stage="stage1", mix_ratio=1.0), "mix_ratio"),
        (dict(lr=0.0), "lr"),
        (dict(epochs=0.0), "epochs"),
        (dict(block_size=0), "block_size"),
        (dict(router_warmup_on="sometimes"), "router_warmup_on"),
    ]:
        with pytest.raises(ValueError, match=f"FinetuneConfig.{field}"):
            FinetuneConfig(**bad)
    with pytest.raises(ValueError, match="unknown field"):
        FinetuneConfig.from_dict({"learning_rate": 1e-3})


def test_router_warmup_moves_only_the_routers(tok):
    model = _model(tok, num_experts=4, n_layer=4)
    model.transformer.h[1].attn.c_proj.weight.requires_grad_(False)  # a caller's own freezing is restored as is
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    enc = encode_for_training(tok, animal_task(32, 0), 32)
    batches = TaskBatches(enc, 8, torch.Generator().manual_seed(0))
    tcfg = TrainConfig(batch_size=8, micro_batch_size=8, weight_decay=0.1)
    info = router_warmup(model, batches, tcfg, steps=3, lr=1e-2)
    routers = {f"transformer.h.{i}.mlp.router.weight" for i in (0, 2)}
    for n, p in model.named_parameters():
        if n in routers:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n  # bit-exact
        assert p.requires_grad == flags[n] and p.grad is None
    assert info["steps"] == 3 and np.isfinite(info["first_loss"])
    with pytest.raises(ValueError, match="dense"):
        router_warmup(_model(tok), batches, tcfg, steps=1, lr=1e-2)


def test_short_finetune_learns_a_synthetic_task(tok, tmp_path):
    train, val = animal_task(256, 0), animal_task(100, 1)
    model = _model(tok, num_experts=4)
    before = evaluate_task(model, tok, val)["accuracy"]
    res = finetune(model, tok, train, val, _cfg(steps=60, eval_every=30), tmp_path, progress=False, meta={"z": 4})
    assert chance_baseline(val) == 0.5 and before < 0.75
    assert res.final_accuracy >= 0.9 and res.best_accuracy >= res.final_accuracy
    assert [h["step"] for h in res.history] == [30, 60] and res.steps == 60
    best = checkpoint.load(res.best_checkpoint)
    meta = checkpoint.read_config(res.best_checkpoint)[1]
    assert meta["val_accuracy"] == res.best_accuracy and meta["step"] == res.best_step and meta["z"] == 4
    again = evaluate_task(best, checkpoint.load_tokenizer(res.best_checkpoint), val)
    assert again["accuracy"] == res.best_accuracy  # the best checkpoint is self-contained
    evals = [r for r in read_metrics(res.metrics) if r["kind"] == "eval"]
    assert [r["val_accuracy"] for r in evals] == [h["val_accuracy"] for h in res.history]
    assert json.loads((tmp_path / "finetune.json").read_text())["best_accuracy"] == res.best_accuracy


def test_reduced_model_gets_router_warmup_first(tok, tmp_path):
    model = _model(tok, num_experts=4, expert_map=[[0, 1, 2, 3, 3, 2, 1, 0]])
    res = finetune(
        model,
        tok,
        animal_task(32, 0),
        animal_task(8, 1),
        _cfg(steps=2, router_warmup_steps=2),
        tmp_path,
        progress=False,
    )
    assert res.router_warmup is not None and res.router_warmup["steps"] == 2
    cfg = _cfg(steps=1, router_warmup_steps=2)
    plain = finetune(_model(tok, num_experts=4), tok, animal_task(32, 0), animal_task(8, 1), cfg, tmp_path / "b")
    assert plain.router_warmup is None  # not reduced, router_warmup_on="reduced"


def test_stage1_mixes_pretraining_windows_by_ratio(tok, tmp_path):
    enc = encode_for_training(tok, animal_task(16, 0), 32)
    tokens = np.arange(1000, dtype=np.uint16) % tok.vocab_size
    gen = torch.Generator().manual_seed(0)
    mix = MixedBatches(TaskBatches(enc, 4, gen), tokens, 0.25, 16, gen)
    kinds = []
    for _ in range(40):
        idx, targets, mask = mix()
        kinds.append("task" if bool((targets == -1).any()) else "lm")  # LM windows have a target everywhere
        if kinds[-1] == "lm":
            assert idx.shape == (4, 16) and bool(mask.all()) and torch.equal(targets[:, :-1], idx[:, 1:])
    assert kinds == (["task"] * 3 + ["lm"]) * 10  # exactly a quarter, evenly spread
    stage1 = _cfg(steps=2, stage="stage1", mix_ratio=0.5, micro_batch_size=8)
    res = finetune(_model(tok), tok, animal_task(32, 0), animal_task(8, 1), stage1, tmp_path, tokens, progress=False)
    assert np.isfinite(res.final_train_loss)
    with pytest.raises(ValueError, match="needs pretrain_tokens"):
        finetune(_model(tok), tok, animal_task(8, 0), animal_task(8, 1), _cfg(stage="stage1", mix_ratio=0.5), tmp_path)
    with pytest.raises(ValueError, match="FinetuneConfig.block_size: 64 exceeds"):
        finetune(_model(tok), tok, animal_task(8, 0), animal_task(8, 1), _cfg(block_size=64), tmp_path)


def test_finetune_resume_is_bit_exact(tok, tmp_path, monkeypatch):
    train, val = animal_task(40, 0), animal_task(10, 1)
    cfg = _cfg(steps=6, batch_size=8, micro_batch_size=4, eval_every=3, checkpoint_every=3, log_every=1)
    finetune(_model(tok, num_experts=4), tok, train, val, cfg, tmp_path / "full", progress=False)

    class Crash(Exception):
        pass

    real = ft.evaluate_task
    calls = []

    def crash_on_first(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise Crash
        return real(*a, **k)

    monkeypatch.setattr(ft, "evaluate_task", crash_on_first)
    with pytest.raises(Crash):
        finetune(_model(tok, num_experts=4), tok, train, val, cfg, tmp_path / "split", progress=False)
    assert checkpoint.read_config(tmp_path / "split" / "checkpoint")[1]["step"] == 3
    finetune(_model(tok, num_experts=4), tok, train, val, cfg, tmp_path / "split", progress=False, resume=True)
    a, b = (checkpoint.load(tmp_path / d / "checkpoint").state_dict() for d in ("full", "split"))
    for n in a:
        assert torch.equal(a[n], b[n]), n
    rows = {d: read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "split")}
    train_losses = {d: [(r["step"], r["loss"]) for r in rows[d] if r["kind"] == "train"] for d in rows}
    assert train_losses["full"] == train_losses["split"] and len(train_losses["full"]) == 6
    final_eval = {d: [r for r in rows[d] if r["kind"] == "eval"][-1] for d in rows}
    assert final_eval["full"]["val_accuracy"] == final_eval["split"]["val_accuracy"]


def test_cli_finetune_then_evaluate_into_a_store(tok, tmp_path, capsys):
    from pathlib import Path

    from smoe_lab.cli import main
    from smoe_lab.results import ResultsStore

    fixtures = str(Path(__file__).parent / "fixtures" / "superglue")
    src = checkpoint.save(
        _model(tok, num_experts=4, block_size=64), tmp_path / "base", tokenizer=tok, base_model="tiny"
    )
    sets = ["steps=2", "batch_size=2", "micro_batch_size=2", "lr=1e-3", "warmup_steps=0", "device=cpu"]
    argv = ["finetune", "--checkpoint", str(src), "--task", "rte", "--root", fixtures, "--out", str(tmp_path / "ft")]
    assert main([*argv, *[x for s in sets for x in ("--set", s)], "--no-progress"]) == 0
    assert "best accuracy" in capsys.readouterr().out
    meta = checkpoint.read_config(tmp_path / "ft" / "best")[1]
    assert (meta["base_model"], meta["method"], meta["z"], meta["d"], meta["stage"]) == ("tiny", "none", 4, 4, "stage2")
    db = tmp_path / "results.sqlite"
    ev = ["evaluate", "--checkpoint", str(tmp_path / "ft" / "best"), "--task", "RTE", "--root", fixtures]
    assert main([*ev, "--store", str(db), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "RTE validation: accuracy" in out and "chance 0.5000" in out and "majority 0.5000" in out
    rows = ResultsStore(db).rows()
    assert sorted(rows["metric"]) == ["accuracy", "loss"]
    assert set(rows["task"]) == {"rte"} and set(rows["stage"]) == {"stage2"} and set(rows["base_model"]) == {"tiny"}
    assert json.loads(rows["extra_json"][0])["split"] == "validation"
    assert main([*argv, "--set", "stage=stage9"]) == 2
    assert "smoe-lab: error: FinetuneConfig.stage" in capsys.readouterr().err
