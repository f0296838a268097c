import json

import pytest
import torch

from smoe_lab import checkpoint
from smoe_lab.config import ModelConfig, TrainConfig
from smoe_lab.data.corpus import get_batch, prepare
from smoe_lab.model import GPT
from smoe_lab.train import fit, lr_at, param_groups, pretrain, read_metrics

SMALL = dict(n_layer=2, d_model=64, n_head=2, d_ff=128)


@pytest.fixture(scope="module")
def corpus():
    return prepare("tiny")


def test_lr_schedule_warmup_then_linear_decay():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1, micro_batch_size=1, batch_size=1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices(tiny_cfg):
    m = GPT(tiny_cfg.replace(num_experts=4))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(names[id(p)].endswith(("weight", "w_in", "w_out")) for p in decay["params"])
    assert not any("ln_" in names[id(p)] for p in decay["params"])
    no = {names[id(p)].split(".")[-1] for p in no_decay["params"]}
    assert no == {"bias", "b_in", "b_out", "weight"}  # LayerNorm weights are 1-D: no decay


@pytest.mark.parametrize("experts", [1, 4])
def test_loss_falls_on_the_real_tiny_corpus(tmp_path, corpus, experts):
    mcfg = ModelConfig.preset("tiny", num_experts=experts, **SMALL)
    tcfg = TrainConfig(
        max_steps=30,
        batch_size=16,
        micro_batch_size=8,
        lr=3e-3,
        warmup_steps=5,
        eval_every=30,
        eval_batches=4,
        log_every=1,
    )
    res = pretrain(mcfg, tcfg, corpus, tmp_path, progress=False)
    rows = [r for r in read_metrics(res.metrics) if r["kind"] == "train"]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert first > 7.5 and last < first - 1.0, (first, last)
    assert res.eval["val_loss"] < first - 1.0
    if experts > 1:
        assert len(rows[-1]["drop_frac"]) == 1 and rows[-1]["aux"] > 0


def test_resume_is_bit_exact(tmp_path, corpus):
    mcfg = ModelConfig.preset("tiny", num_experts=4, **SMALL)
    tcfg = TrainConfig(
        max_steps=6,
        batch_size=8,
        micro_batch_size=4,
        lr=1e-3,
        warmup_steps=2,
        eval_every=3,
        eval_batches=2,
        checkpoint_every=3,
        log_every=1,
    )
    full = pretrain(mcfg, tcfg, corpus, tmp_path / "full", progress=False)

    class Crash(Exception):
        pass

    import smoe_lab.train as train_mod

    real_fit = train_mod.fit

    def crashing_fit(*a, **k):
        def boom(step, row):  # step 6's evaluation runs before step 6's checkpoint: the last one is step 3's
            if step == 6:
                raise Crash

        return real_fit(*a, **k, on_eval=boom)

    train_mod.fit = crashing_fit
    try:
        with pytest.raises(Crash):
            pretrain(mcfg, tcfg, corpus, tmp_path / "split", progress=False)
    finally:
        train_mod.fit = real_fit
    assert checkpoint.read_config(tmp_path / "split" / "checkpoint")[1]["step"] == 3
    pretrain(mcfg, tcfg, corpus, tmp_path / "split", resume=True, progress=False)
    a, b = checkpoint.load(tmp_path / "full" / "checkpoint"), checkpoint.load(tmp_path / "split" / "checkpoint")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(full.metrics)) == strip(read_metrics(tmp_path / "split" / "metrics.jsonl"))


def test_nan_loss_is_a_clear_error_and_keeps_last_checkpoint(tmp_path, tiny_cfg):
    model = GPT(tiny_cfg)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 97, (4096,)).numpy()
    calls = {"n": 0}

    def next_batch():
        calls["n"] += 1
        x, y = get_batch(tokens, 2, 16, gen)
        if calls["n"] > 2:
            with torch.no_grad():
                model.transformer.wte.weight.fill_(float("nan"))
        return x, y, None

    cfg = TrainConfig(max_steps=5, batch_size=2, micro_batch_size=2, checkpoint_every=1, warmup_steps=0)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        fit(model, cfg, next_batch, tmp_path, gen, progress=False)
    meta = json.loads((tmp_path / "checkpoint" / "config.json").read_text())["meta"]
    assert meta["step"] == 2


def test_missing_corpus_is_a_clear_error(tmp_path):
    mcfg = ModelConfig.preset("tiny")
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        pretrain(mcfg, TrainConfig(max_steps=1, batch_size=1, micro_batch_size=1), tmp_path / "nope", tmp_path)


def test_a_warmup_longer_than_the_run_is_refused(tmp_path, tiny_cfg):
    from smoe_lab.config import PretrainParams

    cfg = TrainConfig(max_steps=10, warmup_steps=50, batch_size=2, micro_batch_size=2)
    with pytest.raises(ValueError, match="TrainConfig.warmup_steps: 50 exceeds max_steps=10"):
        cfg.check_schedule()
    with pytest.raises(ValueError, match="warmup_steps: 50 exceeds max_steps=10"):
        fit(GPT(tiny_cfg), cfg, lambda: None, tmp_path / "run", torch.Generator(), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="warmup_steps: 50 exceeds max_steps=10"):
        PretrainParams.from_dict({"train": {"max_steps": 10, "warmup_steps": 50}})
    TrainConfig(max_steps=10, warmup_steps=10).check_schedule()  # peak lr at the last step is fine


def test_derived_run_lengths_clamp_the_warmup_with_a_warning(caplog):
    """Steps derived from epochs (finetuning) or tokens (notebook 01) clamp the warmup to the run, logged, so the
    peak lr is reached (the paper's 500 warmup steps and 50 epochs give CB 196 steps)."""
    from smoe_lab.finetune import FinetuneConfig
    from smoe_lab.notebook_params import PretrainNotebook

    with caplog.at_level("WARNING", logger="smoe_lab"):
        t = FinetuneConfig.paper().train_config(196)
        nb = PretrainNotebook(tokens=4096, batch_size=8, micro_batch_size=8, warmup_steps=20, variants=[1])
        p = nb.train_config()
    assert t.warmup_steps == 196 and lr_at(195, t) == pytest.approx(t.lr)
    assert p.max_steps == 4 and p.warmup_steps == 4
    text = caplog.text
    assert "warmup_steps: 500 exceeds the run's 196 steps" in text and "warmup_steps: 20 exceeds the 4 steps" in text


def test_the_compile_switch_that_did_nothing_is_gone():
    with pytest.raises(ValueError, match="unknown field.*compile"):
        TrainConfig.from_dict({"compile": True})


def test_router_group_gets_its_lr_multiplier_and_weight_decay(tiny_cfg):
    from smoe_lab.train import make_optimizer, set_lr

    m = GPT(tiny_cfg.replace(num_experts=4))
    assert len(param_groups(m, 0.1)) == 2  # the paper's settings: exactly the two groups
    groups = param_groups(m, 0.1, router_lr_mult=10.0, router_weight_decay=0.0)
    routers = {id(layer.router.weight) for layer in m.moe_layers()}
    assert {id(p) for p in groups[2]["params"]} == routers
    assert groups[2]["weight_decay"] == 0.0 and groups[2]["lr_scale"] == 10.0
    assert not routers & {id(p) for g in groups[:2] for p in g["params"]}
    # one AdamW step from zero moments moves each weight by lr * sign(grad): the routers by 10 x lr
    cfg = TrainConfig(lr=1e-3, weight_decay=0.0, router_lr_mult=10.0, batch_size=2, micro_batch_size=2)
    opt = make_optimizer(m, cfg)
    set_lr(opt, 1e-3)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    _, loss, aux = m(idx, idx)
    (loss + aux).backward()
    opt.step()
    step = {n: float((p.detach() - before[n]).abs().max()) for n, p in m.named_parameters()}
    assert step["transformer.h.0.mlp.router.weight"] == pytest.approx(1e-2, rel=1e-3)
    assert step["transformer.h.0.attn.c_attn.weight"] == pytest.approx(1e-3, rel=1e-3)


def test_pretraining_logs_router_health_per_layer(tmp_path, corpus):
    mcfg = ModelConfig.preset("tiny", num_experts=4, **SMALL)
    tcfg = TrainConfig(max_steps=2, batch_size=4, micro_batch_size=4, warmup_steps=0, eval_every=2, eval_batches=1)
    with pytest.warns(UserWarning, match="routers did not specialise"):
        res = pretrain(mcfg, tcfg, corpus, tmp_path, progress=False)
    rows = read_metrics(res.metrics)
    for kind in ("train", "eval"):
        row = [r for r in rows if r["kind"] == kind][-1]
        for key in ("entropy_ratio", "top1_gate", "max_share", "min_share", "drop_frac", "router_entropy"):
            assert len(row[key]) == 1, (kind, key)
        assert 0.8 < row["entropy_ratio"][0] <= 1.0 and 0.25 <= row["top1_gate"][0] < 0.5
