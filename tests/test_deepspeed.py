"""DeepSpeed engine, DeepSpeed-MoE layers and checkpoint interchange on CPU (gloo; world size 1, and 2 processes
for expert parallelism). Parity is checked against the torch engine and the native MoE layer."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from required import need_module

need_module("deepspeed", "deepspeed")  # fails instead of skipping where SMOE_LAB_REQUIRE names deepspeed

from smoe_lab import checkpoint  # noqa: E402
from smoe_lab.calibrate import calibrate  # noqa: E402
from smoe_lab.cli import main  # noqa: E402
from smoe_lab.config import ModelConfig, TrainConfig  # noqa: E402
from smoe_lab.ds import convert  # noqa: E402
from smoe_lab.ds.engine import ds_config, grad_accum_steps  # noqa: E402
from smoe_lab.ds.moe import DeepSpeedMoELayer  # noqa: E402
from smoe_lab.model import GPT  # noqa: E402
from smoe_lab.moe import MoELayer  # noqa: E402
from smoe_lab.reduce import reduce_model  # noqa: E402
from smoe_lab.train import fit, read_metrics  # noqa: E402

V, T = 97, 16
NO_DROP = dict(capacity_factor_train=8.0, capacity_factor_eval=8.0)  # capacity never binds: token identity agrees


@pytest.fixture
def moe_cfg(tiny_cfg):
    return tiny_cfg.replace(num_experts=4)


def _train_cfg(engine: str, **kw) -> TrainConfig:
    base = dict(max_steps=3, batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=1, log_every=1, eval_every=0)
    return TrainConfig(**{**base, **kw}, engine=engine)


def _batches(seed: int = 0, micro: int = 4, crash_after: int | None = None):
    g = torch.Generator().manual_seed(seed)
    drawn = [0]

    def next_batch():
        if crash_after is not None and drawn[0] == crash_after:
            raise RuntimeError("simulated crash")
        drawn[0] += 1
        x = torch.randint(0, V, (micro, T), generator=g)
        return x, torch.roll(x, -1, 1), None

    return next_batch, g


def _run(engine: str, out: Path, mcfg: ModelConfig, crash_after: int | None = None, resume: bool = False, **kw):
    """(train rows of metrics.jsonl, model) after fit from GPT(mcfg, seed=0)."""
    tcfg = _train_cfg(engine, **kw)
    next_batch, g = _batches(micro=tcfg.micro_batch_size, crash_after=crash_after)
    model = GPT(mcfg, seed=0)
    res = fit(model, tcfg, next_batch, out, g, resume=resume, progress=False)
    return [r for r in read_metrics(res.metrics) if r["kind"] == "train"], model


def _assert_rows_close(a, b, rel=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "aux"):
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-6), (key, ra, rb)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4), (ra, rb)
        assert ra["tokens"] == rb["tokens"] and ra["drop_frac"] == rb["drop_frac"]


def _assert_states_close(a: dict, b: dict, atol: float = 1e-5):
    assert set(a) == set(b)
    for k in a:
        # attention key biases get no gradient beyond round-off, which Adam amplifies: loose there
        tol = 1e-4 if k.endswith("attn.c_attn.bias") else atol
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=k)


def _layers(model):
    return model.moe_layers()


# -- configuration ------------------------------------------------------------------------------------------------
def test_config_fields_are_validated():
    cfg = ModelConfig.preset("tiny", num_experts=8, moe_impl="deepspeed", ep_size=4, use_rts=True)
    assert cfg.ep_size == 4 and cfg.use_rts
    with pytest.raises(ValueError, match="moe_impl"):
        ModelConfig.preset("tiny", num_experts=8, moe_impl="megablocks")
    with pytest.raises(ValueError, match="ep_size"):
        ModelConfig.preset("tiny", num_experts=6, moe_impl="deepspeed", ep_size=4)
    with pytest.raises(ValueError, match="ep_size"):
        ModelConfig.preset("tiny", num_experts=8, ep_size=2)  # native layers are never expert parallel
    with pytest.raises(ValueError, match="use_rts"):
        ModelConfig.preset("tiny", use_rts="yes")
    assert TrainConfig(engine="deepspeed", zero_stage=2).zero_stage == 2
    with pytest.raises(ValueError, match="engine"):
        TrainConfig(engine="ds")
    with pytest.raises(ValueError, match="zero_stage"):
        TrainConfig(engine="deepspeed", zero_stage=3)


def test_generated_deepspeed_config():
    paper = TrainConfig(batch_size=512, micro_batch_size=8, grad_clip=1.0, engine="deepspeed", zero_stage=2)
    c = ds_config(paper, world_size=32, device_type="cuda")
    assert c["train_batch_size"] == 512 and c["train_micro_batch_size_per_gpu"] == 8
    assert c["gradient_accumulation_steps"] == 2 and c["gradient_clipping"] == 1.0
    assert c["zero_optimization"]["stage"] == 2 and c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    cpu = ds_config(paper.replace(zero_stage=0), world_size=1, device_type="cpu")
    assert not cpu["bf16"]["enabled"] and cpu["gradient_accumulation_steps"] == 64
    assert cpu["gradient_clipping"] == 0.0  # fp32 ZeRO-0: the engine clips with the exact global norm itself
    with pytest.raises(ValueError, match="micro_batch_size x world_size"):
        grad_accum_steps(paper, world_size=3)


# -- layers and conversion ----------------------------------------------------------------------------------------
def test_same_init_for_native_and_deepspeed_layers(moe_cfg):
    native = GPT(moe_cfg, seed=3)
    ds = GPT(moe_cfg.replace(moe_impl="deepspeed"), seed=3)
    assert all(isinstance(m, DeepSpeedMoELayer) for m in _layers(ds)) and len(_layers(ds)) == 1
    back = convert.to_native(ds).state_dict()
    for k, v in native.state_dict().items():
        assert torch.equal(v, back[k]), k
    assert ds.num_params() == native.num_params() and ds.num_active_params() == native.num_active_params()


def test_round_trip_native_deepspeed_native_is_exact(moe_cfg):
    native = GPT(moe_cfg.replace(n_layer=4), seed=1).eval()  # two MoE layers; capacity binds at cf 1.0
    ds = convert.to_deepspeed(native)
    back = convert.to_native(ds)
    for k, v in native.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, y_back = native(x), back(x)
    assert torch.equal(y, y_back)
    for a, b in zip(native.telemetry(), back.telemetry()):
        assert torch.equal(a.router_logits, b.router_logits) and torch.equal(a.routed_counts, b.routed_counts)
        assert torch.equal(a.processed_counts, b.processed_counts)
    # the DeepSpeed model itself: the native router and expert weights, so the same output when nothing drops
    lay = _layers(ds)[0]
    assert isinstance(lay.router, torch.nn.Linear) and lay.router.weight is lay.deepspeed_moe.gate.wg.weight
    assert torch.equal(lay.experts.w_in, _layers(native)[0].experts.w_in)
    assert torch.equal(lay.experts.b_out, _layers(native)[0].experts.b_out)
    wide_native = GPT(native.config.replace(**NO_DROP)).eval()
    wide_native.load_state_dict(native.state_dict())
    wide_ds = convert.to_deepspeed(wide_native).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide_ds(x), wide_native(x), atol=1e-5, rtol=1e-5)


def _twin_layers(cf: float, e: int = 4, d: int = 32, f: int = 64):
    """A native MoELayer and a DeepSpeedMoELayer holding the same weights (router biased towards expert 0)."""
    g = torch.Generator().manual_seed(0)
    native = MoELayer(d, f, e, capacity_factor_train=cf, capacity_factor_eval=cf, min_capacity=4)
    with torch.no_grad():
        for p in native.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        native.router.weight[0] += 0.5
    ds = DeepSpeedMoELayer(d, f, e, capacity_factor_train=cf, capacity_factor_eval=cf, min_capacity=4)
    prefixed = {f"transformer.h.0.mlp.{k}": v for k, v in native.state_dict().items()}
    cfg = ModelConfig(n_layer=1, n_head=1, d_model=d, d_ff=f, num_experts=e)
    ds_state = convert.native_to_deepspeed_state(prefixed, cfg)
    ds.load_state_dict({k.removeprefix("transformer.h.0.mlp."): v for k, v in ds_state.items()})
    x = torch.randn(2, 24, d, generator=g) + 0.5 * torch.randn(d, generator=g)
    return native, ds, x


@pytest.mark.parametrize("training", [True, False])
def test_telemetry_counts_match_native_layer(training):
    native, ds, x = _twin_layers(cf=1.0)  # 48 tokens, 4 experts: capacity 12, expert 0 overloaded
    native.train(training)
    ds.train(training)
    with torch.no_grad():
        native(x)
        ds(x)
    a, b = native.telemetry, ds.telemetry
    assert a.capacity == b.capacity == 12
    assert int(a.routed_counts.max()) > a.capacity  # tokens are dropped
    assert torch.equal(a.routed_counts, b.routed_counts) and torch.equal(a.processed_counts, b.processed_counts)
    torch.testing.assert_close(b.router_logits, a.router_logits, atol=1e-6, rtol=0)
    assert b.dropped_fraction == pytest.approx(a.dropped_fraction) and b.dropped_fraction > 0
    assert b.router_entropy == pytest.approx(a.router_entropy, rel=1e-6)
    torch.testing.assert_close(ds.aux_loss, native.aux_loss, atol=1e-6, rtol=1e-6)


def test_telemetry_with_padding_mask_matches_native_layer():
    native, ds, x = _twin_layers(cf=8.0)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 15:] = False
    with torch.no_grad():
        y_native, y_ds = native(x, mask), ds(x, mask)
    a, b = native.telemetry, ds.telemetry
    assert a.num_tokens == b.num_tokens == 39
    assert torch.equal(a.routed_counts, b.routed_counts) and torch.equal(a.processed_counts, b.processed_counts)
    assert int(b.routed_counts.sum()) == 39
    torch.testing.assert_close(b.router_logits, a.router_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(y_ds[mask], y_native[mask], atol=1e-5, rtol=1e-5)
    assert float(y_ds[~mask].abs().max()) == 0.0  # padding is never routed


def test_calibration_of_deepspeed_model_equals_native(moe_cfg):
    native = GPT(moe_cfg, seed=2)
    ds = convert.to_deepspeed(native)
    batches = [torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ca, cb = calibrate(native, batches), calibrate(ds, batches)
    for sa, sb in zip(ca.layers, cb.layers):
        torch.testing.assert_close(sb.gram, sa.gram, rtol=1e-9, atol=1e-9)
        assert torch.equal(sa.top1_counts, sb.top1_counts) and torch.equal(sa.processed_counts, sb.processed_counts)


def test_convert_cli_round_trip_is_byte_identical(tmp_path, moe_cfg):
    src = checkpoint.save(GPT(moe_cfg, seed=4), tmp_path / "native", step=7)
    common = ["--checkpoint"]
    assert (
        main(["convert", "--from", "native", "--to", "deepspeed", *common, str(src), "--out", str(tmp_path / "ds")])
        == 0
    )
    ds_cfg, meta = checkpoint.read_config(tmp_path / "ds")
    assert ds_cfg.moe_impl == "deepspeed" and meta["converted_from"]["format"] == "native" and meta["step"] == 7
    ds_model = checkpoint.load(tmp_path / "ds")  # ep_size 1: loads as it is, DeepSpeed-MoE layers
    assert isinstance(_layers(ds_model)[0], DeepSpeedMoELayer)
    argv = ["convert", "--from", "deepspeed", "--to", "native", *common, str(tmp_path / "ds"), "--out"]
    assert main([*argv, str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert main(["convert", "--from", "deepspeed", "--to", "native", *common, str(src), "--out", "x"]) == 2
    assert main(["convert", "--from", "native", "--to", "native", *common, str(src), "--out", "x"]) == 2
    bad = ["convert", "--from", "native", "--to", "deepspeed", "--ep-size", "3", *common, str(src), "--out", "x"]
    assert main(bad) == 2


# -- the engine -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_engine_matches_torch_engine(tmp_path, moe_cfg, zero_stage):
    torch_rows, torch_model = _run("torch", tmp_path / "torch", moe_cfg)
    ds_rows, _ = _run("deepspeed", tmp_path / "ds", moe_cfg, zero_stage=zero_stage)
    assert ds_rows[0]["grad_norm"] > 1.0  # clipping is active
    _assert_rows_close(ds_rows, torch_rows)
    saved = checkpoint.load(tmp_path / "ds" / "checkpoint")  # the project's format, written by rank 0
    _assert_states_close(saved.state_dict(), torch_model.state_dict())
    _, meta = checkpoint.read_config(tmp_path / "ds" / "checkpoint")
    assert meta["train_engine"]["zero_stage"] == zero_stage and meta["step"] == 3
    tags = sorted(p.name for p in (tmp_path / "ds" / "checkpoint_deepspeed").glob("global_step*"))
    assert tags == ["global_step3"]


def test_deepspeed_engine_honours_router_options(tmp_path, moe_cfg):
    # router lr multiplier / weight decay (optimizer side, param groups through ZeRO-2) and init std on DeepSpeed-MoE
    # layers: the same training as the torch engine with native layers
    opts = dict(router_lr_mult=10.0, router_weight_decay=0.0, weight_decay=0.1)
    mcfg = moe_cfg.replace(router_init_std=0.05, **NO_DROP)  # DeepSpeed keeps other tokens when capacity binds
    torch_rows, torch_model = _run("torch", tmp_path / "torch", mcfg, **opts)
    ds_rows, _ = _run("deepspeed", tmp_path / "ds", mcfg.replace(moe_impl="deepspeed"), zero_stage=2, **opts)
    _assert_rows_close(ds_rows, torch_rows)
    saved = checkpoint.load(tmp_path / "ds" / "checkpoint")
    _assert_states_close(saved.state_dict(), torch_model.state_dict())
    plain_rows, _ = _run("torch", tmp_path / "plain", mcfg)
    assert plain_rows[-1]["loss"] != torch_rows[-1]["loss"]  # the options changed the training


def test_deepspeed_engine_resume_is_exact(tmp_path, moe_cfg):
    moe_cfg = moe_cfg.replace(moe_impl="deepspeed")  # resume reads DeepSpeed's per-expert files too
    full_rows, full = _run("deepspeed", tmp_path / "full", moe_cfg, max_steps=4, checkpoint_every=2)
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies while drawing step 3's first micro-batch
        _run("deepspeed", tmp_path / "crash", moe_cfg, max_steps=4, checkpoint_every=2, crash_after=4)
    rows, resumed = _run("deepspeed", tmp_path / "crash", moe_cfg, max_steps=4, checkpoint_every=2, resume=True)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_deepspeed_engine_bf16_runs_and_saves_float32(tmp_path, moe_cfg):
    fp32_rows, _ = _run("deepspeed", tmp_path / "fp32", moe_cfg.replace(moe_impl="deepspeed"), zero_stage=1)
    rows, model = _run(
        "deepspeed", tmp_path / "bf16", moe_cfg.replace(moe_impl="deepspeed"), zero_stage=1, dtype="bfloat16"
    )
    assert next(model.parameters()).dtype == torch.bfloat16  # DeepSpeed trains bf16 weights (fp32 masters)
    for a, b in zip(rows, fp32_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3) and a["grad_norm"] > 0
    saved = checkpoint.load(tmp_path / "bf16" / "checkpoint")
    assert saved.lm_head.weight.dtype == torch.float32


@pytest.fixture(scope="module")
def ds_moe_run(tmp_path_factory):
    """3 steps of a model with DeepSpeed-MoE layers on the DeepSpeed engine, and the same with native layers on
    the torch engine (capacity never binds, so both route every token identically)."""
    out = tmp_path_factory.mktemp("ds_moe")
    cfg = ModelConfig.preset("tiny", n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=V, block_size=T)
    cfg = cfg.replace(num_experts=4, **NO_DROP)
    ds_rows, ds_model = _run("deepspeed", out / "ds", cfg.replace(moe_impl="deepspeed"))
    torch_rows, torch_model = _run("torch", out / "torch", cfg)
    return out, ds_rows, ds_model, torch_rows, torch_model


def test_deepspeed_moe_layers_train_like_native_layers(ds_moe_run):
    out, ds_rows, ds_model, torch_rows, torch_model = ds_moe_run
    _assert_rows_close(ds_rows, torch_rows)
    saved = checkpoint.load(out / "ds" / "checkpoint")  # saved in the native layout
    assert saved.config.moe_impl == "native" and isinstance(_layers(saved)[0], MoELayer)
    _assert_states_close(saved.state_dict(), torch_model.state_dict())
    _assert_states_close(convert.to_native(ds_model).state_dict(), torch_model.state_dict())


def test_engine_checkpoint_converts_and_reduces(ds_moe_run, tmp_path):
    out, *_ = ds_moe_run
    engine_dir = out / "ds" / "checkpoint_deepspeed"
    files = sorted(p.name for p in (engine_dir / "global_step3").glob("layer_*_expert_*_model_states.pt"))
    assert files == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]
    model = convert.load_engine_checkpoint(engine_dir)  # native layout, from DeepSpeed's own files
    saved = checkpoint.load(out / "ds" / "checkpoint")
    for k, v in saved.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    batches = [torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    reduced, report = reduce_model(model, "uncurl", 2, batches, router="merge")
    assert reduced.config.experts_per_layer == [2] and report.layers[0].experts_before == 4
    assert torch.isfinite(reduced(batches[0])).all()
    # the CLI route writes the same weights as the project checkpoint, with the tokenizer-free meta of the run
    argv = ["convert", "--from", "deepspeed-engine", "--to", "native", "--checkpoint", str(engine_dir)]
    assert main([*argv, "--out", str(tmp_path / "native")]) == 0
    assert checkpoint.load(tmp_path / "native").state_dict().keys() == saved.state_dict().keys()
    # ...and the reduced native model trains again with DeepSpeed-MoE layers on the DeepSpeed engine
    checkpoint.save(reduced, tmp_path / "reduced")
    again = convert.load_as_deepspeed(tmp_path / "reduced")
    assert isinstance(_layers(again)[0], DeepSpeedMoELayer) and again.config.experts_per_layer == [2]
    next_batch, g = _batches(seed=1)
    res = fit(again, _train_cfg("deepspeed", max_steps=2), next_batch, tmp_path / "ft", g, progress=False)
    assert res.final_loss == res.final_loss and checkpoint.read_config(res.checkpoint)[0].experts_per_layer == [2]


# -- expert parallelism: two processes -----------------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from smoe_lab.config import ModelConfig, TrainConfig
    from smoe_lab.model import GPT
    from smoe_lab.train import fit, resolve_device
    cfg = ModelConfig.preset("tiny", n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=97, block_size=16)
    cfg = cfg.replace(num_experts=4, capacity_factor_train=8.0, capacity_factor_eval=8.0, moe_impl="deepspeed",
                      ep_size=2)
    tcfg = TrainConfig(max_steps=3, batch_size=8, micro_batch_size=2, lr=1e-2, warmup_steps=1, log_every=1,
                       eval_every=0, engine="deepspeed", zero_stage=int(sys.argv[2]))
    resolve_device(tcfg)  # joins the process group before the expert-parallel model is built
    g = torch.Generator().manual_seed(0)
    def next_batch():
        x = torch.randint(0, 97, (2, 16), generator=g)
        return x, torch.roll(x, -1, 1), None
    model = GPT(cfg, seed=0)
    assert model.moe_layers()[0].num_local_experts == 2
    fit(model, tcfg, next_batch, sys.argv[1], g, progress=False)
    """
)


def _launch_two_ranks(script: Path, out: Path, zero_stage: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(script), str(out), str(zero_stage)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


def test_expert_parallel_training_on_two_ranks_matches_torch_engine(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _launch_two_ranks(script, tmp_path / "ep", zero_stage=2)
    cfg = ModelConfig.preset("tiny", n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=V, block_size=T)
    rows, torch_model = _run("torch", tmp_path / "torch", cfg.replace(num_experts=4, **NO_DROP), micro_batch_size=2)
    ep_rows = [r for r in read_metrics(tmp_path / "ep" / "metrics.jsonl") if r["kind"] == "train"]
    _assert_rows_close(ep_rows, rows)
    saved = checkpoint.load(tmp_path / "ep" / "checkpoint")  # experts all-gathered over the expert-parallel group
    _assert_states_close(saved.state_dict(), torch_model.state_dict())
    engine_dir = tmp_path / "ep" / "checkpoint_deepspeed"
    experts = sorted(p.name for p in (engine_dir / "global_step3").glob("layer_0_expert_*"))
    assert len(experts) == 4  # two files from each rank
    from_engine = convert.load_engine_checkpoint(engine_dir)
    for k, v in saved.state_dict().items():
        assert torch.equal(v, from_engine.state_dict()[k]), k
    meta = json.loads((tmp_path / "ep" / "checkpoint" / "config.json").read_text())["meta"]
    want = {"engine": "deepspeed", "world_size": 2, "zero_stage": 2, "moe_impl": "deepspeed", "ep_size": 2}
    assert meta["train_engine"] == want
