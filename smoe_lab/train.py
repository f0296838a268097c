"""Training: `fit` (the torch engine's resume and checkpoints around the one step loop, `smoe_lab.loop.run_steps`)
and `pretrain`. Finetuning (smoe_lab.finetune), the router-only warm-up and the DeepSpeed engine
(smoe_lab.ds.engine) run the same loop.

AdamW (weight decay on matrices only), linear warmup + linear decay, gradient clipping, gradient accumulation up
to the global batch, bf16 autocast on CUDA / fp32 on CPU, aux loss added with its coefficient, periodic
evaluation, JSONL metrics, tqdm progress, atomic checkpoints and exact resume.

Resume is exact because a checkpoint holds everything the next step reads: weights, optimizer state, the data
generator, the CPU RNG and (on CUDA) every device's RNG. A step's evaluation runs before its checkpoint is
written, so a checkpoint at step k means step k's evaluation (and best-checkpoint choice) happened.
A warmup longer than the run is refused (`TrainConfig.check_schedule`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .cachekey import corpus_hash, key
from .config import ModelConfig, PretrainParams, TrainConfig
from .data.corpus import get_batch, iter_eval_batches, resolve_corpus
from .data.plan import PlanLoader, SamplePlan
from .ds.engine import fit as deepspeed_fit
from .ds.engine import local_device
from .loop import (  # noqa: F401  (the loop's pieces stay importable from smoe_lab.train)
    NO_DECAY_SUFFIXES,
    Batch,
    FitResult,
    MetricsLog,
    TorchSteps,
    autocast_for,
    lr_at,
    make_optimizer,
    param_groups,
    peak_memory_mb,
    read_metrics,
    run_steps,
    set_lr,
    telemetry_row,
)
from .model import GPT
from .router_health import HealthMeter, health_row, metered, specialisation_warning

_telemetry_row = telemetry_row  # the old private name


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.engine == "deepspeed":  # joins the launcher's process group; this rank's GPU (cuda:LOCAL_RANK) or cpu
        return local_device(cfg)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device: 'cuda' requested but no CUDA device is available")
    return torch.device(cfg.device)


# -- the torch engine's fit: resume and checkpoints around the loop (smoe_lab.loop.run_steps) ----------------------
def fit(
    model: GPT,
    cfg: TrainConfig,
    next_batch: Callable[[], Batch],
    out_dir: str | Path,
    generator: torch.Generator,
    evaluate: Callable[[GPT], dict[str, float]] | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "train",
    checkpoint_name: str = "checkpoint",
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    tokenizer: Any = None,
) -> FitResult:
    """Optimise loss + aux for cfg.max_steps steps; each step accumulates cfg.grad_accum_steps micro-batches.

    next_batch() draws one micro-batch using `generator` (whose state is checkpointed, so resume is exact). It may
    also be a checkpointable loader (smoe_lab.data.plan.PlanLoader: callable, with state_dict / load_state_dict,
    the consumed-sample count), whose state is saved in the train state as "data" and restored on resume.
    Only parameters with requires_grad are optimised (router-only warm-up freezes the rest).
    Raises FloatingPointError on a non-finite loss, before anything is written for that step.
    cfg.engine == "deepspeed" runs the same loop through DeepSpeed over the launcher's ranks (smoe_lab.ds.engine).
    """
    cfg.check_schedule()
    if cfg.engine == "deepspeed":
        return deepspeed_fit(
            model,
            cfg,
            next_batch,
            out_dir,
            generator,
            evaluate,
            resume,
            meta,
            progress,
            desc,
            checkpoint_name,
            on_eval,
            tokenizer,
        )
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    ck_path = out_dir / checkpoint_name
    opt = make_optimizer(model, cfg)
    start = 0
    if resume:
        state = checkpoint.load_train_state(ck_path)
        if state is None:
            raise FileNotFoundError(f"--resume: no checkpoint with train state at {ck_path}")
        weights = checkpoint.load(ck_path, device=device)
        checkpoint.load_weights_into(model, weights.state_dict(), ck_path)
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"{ck_path / checkpoint.TRAIN_STATE}: optimizer state does not fit this model ({e})"
            ) from None
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start = int(state["step"])
        if hasattr(next_batch, "load_state_dict"):  # a data plan: continue at its consumed-sample count
            next_batch.load_state_dict(state.get("data"))
    log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if resume else None)

    def save(step: int) -> None:
        train_state = {
            "step": step,
            "optimizer": opt.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        if hasattr(next_batch, "state_dict"):
            train_state["data"] = next_batch.state_dict()
        checkpoint.save(model, ck_path, train_state=train_state, tokenizer=tokenizer, step=step, **(meta or {}))

    return run_steps(
        TorchSteps(model, opt, cfg, device),
        cfg,
        next_batch,
        cfg.grad_accum_steps,
        start=start,
        log=log,
        evaluate=evaluate,
        on_eval=on_eval,
        save=save,
        ck_path=ck_path,
        metrics_path=out_dir / "metrics.jsonl",
        progress=progress,
        desc=desc,
    )


# -- pretraining --------------------------------------------------------------------------------------------------
@torch.no_grad()
def lm_eval_loss(model: GPT, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device, cfg: TrainConfig) -> float:
    """Mean LM loss over fixed evaluation windows, in eval mode (eval capacity factor)."""
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        with autocast_for(device, cfg):
            _, loss, _ = model(x.to(device), y.to(device))
        total += loss.item()
        n += 1
    if n == 0:
        raise ValueError("evaluation split is empty: no full block_size window fits in it")
    return total / n


def pretrain(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    corpus: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """Pretrain a GPT (dense or SMoE) on a prepared corpus; checkpoint + metrics.jsonl go to out_dir."""
    corpus_obj = resolve_corpus(corpus)
    if corpus_obj.tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"ModelConfig.vocab_size: {model_cfg.vocab_size} is smaller than the corpus tokenizer's "
            f"{corpus_obj.tokenizer.vocab_size}"
        )
    val_tokens = corpus_obj.split("val")
    train_cfg.check_schedule()
    out_dir = Path(out_dir)
    if resume and checkpoint.load_train_state(out_dir / "checkpoint") is None:
        raise FileNotFoundError(f"--resume: no checkpoint with train state at {out_dir / 'checkpoint'}")
    device = resolve_device(train_cfg)
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg, seed=train_cfg.seed).to(device)
    gen = torch.Generator().manual_seed(train_cfg.seed)
    t = model_cfg.block_size

    if corpus_obj.is_sharded:  # a `smoe-lab data build` corpus: its deterministic sample plan, resumed by count
        next_batch = PlanLoader(SamplePlan.from_corpus(corpus_obj, t, seed=train_cfg.seed), train_cfg.micro_batch_size)
    else:
        train_tokens = corpus_obj.split("train")

        def next_batch() -> Batch:
            x, y = get_batch(train_tokens, train_cfg.micro_batch_size, t, gen)
            return x, y, None

    def evaluate(m: GPT) -> dict[str, float]:
        batches = iter_eval_batches(val_tokens, train_cfg.micro_batch_size, t, max_batches=train_cfg.eval_batches)
        meter = HealthMeter()
        loss = lm_eval_loss(m, metered(batches, m, meter), device, train_cfg)
        return {"val_loss": round(loss, 6), **health_row(meter.result())}

    meta = {
        "kind": "pretrain",
        "corpus": str(corpus_obj.path),
        "label": model_cfg.label(),
        "params": model.num_params(),
        "active_params": model.num_active_params(),
        "train_config": train_cfg.to_dict(),
        "cache_key": pretrain_key(model_cfg, train_cfg, corpus_obj.path),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(out_dir / "run.json", json.dumps(meta, indent=2, default=str))
    desc = f"pretrain {model_cfg.label()}"
    tok = corpus_obj.tokenizer
    res = fit(model, train_cfg, next_batch, out_dir, gen, evaluate, resume, meta, progress, desc, tokenizer=tok)
    warn_if_unspecialised(res.eval.get("entropy_ratio") or telemetry_row(model).get("entropy_ratio"), desc)
    return res


def warn_if_unspecialised(entropy_ratios: list[float] | None, what: str) -> str | None:
    """Emit (warnings.warn) and return the router-specialisation warning when a layer ends above 0.8 ln E."""
    msg = specialisation_warning(entropy_ratios or [])
    if msg:
        warnings.warn(f"{what}: {msg}", UserWarning, stacklevel=2)
    return msg


def pretrain_key(model_cfg: ModelConfig, train_cfg: TrainConfig, corpus_path: str | Path) -> str:
    """Cache key of a pretraining run: package source, model and train configs, the corpus's content."""
    return key("pretrain", model=model_cfg.to_dict(), train=train_cfg.to_dict(), corpus=corpus_hash(corpus_path))


def pretrain_from_params(params: PretrainParams, progress: bool = True) -> FitResult:
    return pretrain(
        params.model_config(), params.train_config(), params.corpus, params.out_dir, params.resume, progress=progress
    )


def steps_for_tokens(tokens: int, cfg: TrainConfig, block_size: int) -> int:
    """Optimizer steps that consume `tokens` tokens at cfg.batch_size sequences of block_size."""
    return max(1, math.ceil(tokens / (cfg.batch_size * block_size)))
