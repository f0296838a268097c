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
    base = dict(batch_size=16, micro_batch_size=16, lr=3e-3, warmup_steps=0, weight_decay=0.0, device="cpu")
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
    assert FinetuneConfig(steps=7, warmup_steps=0).total_steps(10_000) == 7
    for bad, field in [
        (dict(stage="stage3"), "stage"),
        (dict(batch_size=10, micro_batch_size=4), "batch_size"),
        (dict(mix_ratio=0.2), "mix_ratio"),  # stage2 has no pretraining mix
        (dict(stage="stage1", mix_ratio=1.0), "mix_ratio"),
        (dict(lr=0.0), "lr"),
        (dict(epochs=0.0), "epochs"),
        (dict(block_size=0), "block_size"),
        (dict(router_warmup_on="sometimes"), "router_warmup_on"),
        (dict(steps=200), "warmup_steps"),  # the README's old example: 500 warmup steps in a 200-step run
        (dict(dev_fraction=0.0), "dev_fraction"),
        (dict(dev_fraction=1.0), "dev_fraction"),
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
    cfg = _cfg(steps=60, eval_every=30, warmup_steps=10)
    res = finetune(model, tok, train, val, cfg, tmp_path, progress=False, meta={"z": 4})
    assert chance_baseline(val) == 0.5 and before < 0.75
    assert res.accuracy >= 0.9 and res.n_report == 100 and res.n_dev == 26 and res.n_train == 230
    assert [h["step"] for h in res.history] == [30, 60] and res.steps == 60
    best = checkpoint.load(res.best_checkpoint)
    meta = checkpoint.read_config(res.best_checkpoint)[1]
    assert meta["dev_accuracy"] == res.dev_accuracy and meta["step"] == res.best_step and meta["z"] == 4
    again = evaluate_task(best, checkpoint.load_tokenizer(res.best_checkpoint), val)
    assert (again["accuracy"], again["loss"]) == (res.accuracy, res.loss)  # the selected checkpoint is self-contained
    evals = [r for r in read_metrics(res.metrics) if r["kind"] == "eval"]
    assert [r["dev_accuracy"] for r in evals] == [h["dev_accuracy"] for h in res.history]
    assert res.dev_accuracy == max(h["dev_accuracy"] for h in res.history)
    assert json.loads((tmp_path / "finetune.json").read_text())["accuracy"] == res.accuracy


def test_selection_on_dev_then_one_report_on_validation(tok, tmp_path, monkeypatch):
    """Periodic evaluations see only dev examples carved from train (never validation); the reported accuracy and
    loss are ONE evaluation of the selected checkpoint on validation, even when a later step scores higher there."""
    train, val = animal_task(64, 0), animal_task(24, 1)
    val = [Example("animal", f"val{i}", e.input, e.choices, e.label) for i, e in enumerate(val)]
    calls = []
    real = ft.evaluate_task

    def spy(model, tok_, examples, *a, **k):
        r = real(model, tok_, examples, *a, **k)
        step = getattr(model, "checkpoint_meta", {}).get("step")  # set only on a model read from disk
        calls.append(({e.idx for e in examples}, r, step))
        return r

    monkeypatch.setattr(ft, "evaluate_task", spy)
    res = finetune(_model(tok, num_experts=4), tok, train, val, _cfg(steps=6, eval_every=2), tmp_path, progress=False)
    val_ids, train_ids = {e.idx for e in val}, {e.idx for e in train}
    during, report = calls[:-1], calls[-1]
    assert len(during) == 3 and all(ids < train_ids and not ids & val_ids for ids, _, _ in during)
    assert report[0] == val_ids and report[2] == res.best_step  # the report scores the checkpoint read from best/
    assert (res.accuracy, res.loss, res.acc_norm) == (report[1]["accuracy"], report[1]["loss"], report[1]["acc_norm"])
    from smoe_lab.protocol import dev_split

    kept, dev = dev_split(train, 0.1, 0, 0)
    assert {e.idx for e in dev} == during[0][0] and len(kept) + len(dev) == len(train) and res.n_train == len(kept)


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
    # the warm-up runs the same step loop as fit: its rows carry the gradient norm and the router telemetry
    rows = read_metrics(tmp_path / "router_warmup.jsonl")
    assert [(r["kind"], r["step"]) for r in rows] == [("router_warmup", 1), ("router_warmup", 2)]
    assert all(r["grad_norm"] > 0 and len(r["entropy_ratio"]) == 1 and r["lr"] == 1e-4 for r in rows)
    assert rows[0]["loss"] == pytest.approx(res.router_warmup["first_loss"], abs=1e-6)
    assert res.router_warmup["grad_norm"] == rows[-1]["grad_norm"]
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

    def crash_on_second(*a, **k):  # the step-6 evaluation, which runs before the step-6 checkpoint is written
        calls.append(1)
        if len(calls) == 2:
            raise Crash
        return real(*a, **k)

    monkeypatch.setattr(ft, "evaluate_task", crash_on_second)
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
    assert final_eval["full"]["dev_accuracy"] == final_eval["split"]["dev_accuracy"]
    reports = {d: json.loads((tmp_path / d / "finetune.json").read_text()) for d in ("full", "split")}
    assert [reports[d]["accuracy"] for d in reports] == [reports["full"]["accuracy"]] * 2


def test_cli_finetune_then_evaluate_into_a_store(tok, tmp_path, capsys):
    """`smoe-lab finetune --store` and `smoe-lab evaluate --store` on the selected checkpoint store the same metric
    names and the same numbers (validation: the report; dev: the selection)."""
    from pathlib import Path

    from smoe_lab.cli import main
    from smoe_lab.results import ResultsStore

    fixtures = str(Path(__file__).parent / "fixtures" / "superglue")
    src = checkpoint.save(
        _model(tok, num_experts=4, block_size=64), tmp_path / "base", tokenizer=tok, base_model="tiny"
    )
    sets = ["steps=2", "batch_size=2", "micro_batch_size=2", "lr=1e-3", "warmup_steps=0", "device=cpu"]
    sets += ["eval_every=1", "eval_batch_size=3", "dev_fraction=0.5"]
    db = tmp_path / "results.sqlite"
    argv = ["finetune", "--checkpoint", str(src), "--task", "rte", "--root", fixtures, "--out", str(tmp_path / "ft")]
    assert main([*argv, *[x for s in sets for x in ("--set", s)], "--store", str(db), "--no-progress"]) == 0
    assert "report (validation" in capsys.readouterr().out
    meta = checkpoint.read_config(tmp_path / "ft" / "best")[1]
    assert (meta["base_model"], meta["method"], meta["z"], meta["d"], meta["stage"]) == ("tiny", "none", 4, 4, "stage2")
    assert meta["eval_spec"]["batch_size"] == 3 and meta["eval_spec"]["block_size"] == 64
    stored = ResultsStore(db).rows()
    names = ["accuracy", "acc_norm", "loss", "dev_accuracy", "dev_acc_norm", "dev_loss"]
    assert list(stored["metric"]) == names
    db2 = tmp_path / "again.sqlite"
    ev = ["evaluate", "--checkpoint", str(tmp_path / "ft" / "best"), "--task", "RTE", "--root", fixtures]
    assert main([*ev, "--store", str(db2), "--device", "cpu", "--no-progress"]) == 0
    assert main([*ev, "--split", "dev", "--store", str(db2), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "RTE validation: accuracy" in out and "chance 0.5000" in out and "majority 0.5000" in out
    again = ResultsStore(db2).rows()
    assert list(again["metric"]) == names
    assert list(again["value"]) == list(stored["value"])  # bit for bit: same examples, batches, block, dtype
    assert set(again["task"]) == {"rte"} and set(again["stage"]) == {"stage2"} and set(again["base_model"]) == {"tiny"}
    assert json.loads(again["extra_json"][0])["split"] == "validation"
    assert main([*argv, "--set", "stage=stage9"]) == 2
    assert "smoe-lab: error: FinetuneConfig.stage" in capsys.readouterr().err
