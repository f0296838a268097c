"""The router-only warm-up (paper appendix A4): freeze everything but the MoE routers, train them for a few steps
with the one step loop (smoe_lab.loop.run_steps), unfreeze. smoe_lab.finetune runs it before finetuning a reduced
model (whose routers are re-initialised) and re-exports these names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .loop import Batch, MetricsLog, TorchSteps, make_optimizer, run_steps


def router_parameters(model) -> list[torch.nn.Parameter]:
    """The router weight [E, d_model] of every MoE layer, in depth order."""
    return [layer.router.weight for layer in model.moe_layers()]


@contextmanager
def only_routers_trainable(model) -> Iterator[None]:
    """Inside: requires_grad only on the MoE routers. On exit every parameter's requires_grad is restored."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    routers = {id(p) for p in router_parameters(model)}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in routers)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def router_warmup(
    model,
    next_batch: Callable[[], Batch],
    train_cfg: TrainConfig,
    steps: int,
    lr: float,
    progress: bool = False,
    metrics: str | Path | None = None,
) -> dict[str, Any]:
    """Train only the MoE routers for `steps` optimizer steps at a constant `lr`, then unfreeze.

    The one step loop (`smoe_lab.loop.run_steps`) with train.py's optimizer (AdamW over requires_grad parameters
    only, so nothing else moves, not even by weight decay; `lr` is not scaled by router_lr_mult), autocast,
    accumulation (train_cfg.grad_accum_steps micro-batches per step) and clipping. metrics: a JSONL file for the
    rows (kind "router_warmup": loss, aux, lr, grad_norm, tokens, router telemetry; every train_cfg.log_every
    steps, the first and the last). Returns {"steps", "seconds", "first_loss", "last_loss", "grad_norm" (the last
    step's, before clipping), "metrics"}. A non-finite loss raises FloatingPointError.
    """
    if not model.moe_layers():
        raise ValueError("router warm-up needs an MoE model; this one is dense")
    if steps < 1:
        raise ValueError(f"router warm-up steps must be >= 1, got {steps}")
    cfg = train_cfg.replace(max_steps=steps, lr=lr, min_lr=lr, warmup_steps=0)
    device = next(model.parameters()).device
    log = None if metrics is None else MetricsLog(Path(metrics))
    seen: list[tuple[float, float]] = []  # (loss, grad norm) of every step
    with only_routers_trainable(model):
        opt = make_optimizer(model, cfg)
        for g in opt.param_groups:
            g.pop("lr_scale", None)  # the warm-up's lr is its own
        res = run_steps(
            TorchSteps(model, opt, cfg, device),
            cfg,
            next_batch,
            cfg.grad_accum_steps,
            log=log,
            metrics_path=None if log is None else log.path,
            progress=progress,
            desc="router warm-up",
            kind="router_warmup",
            fault_point=None,
            on_step=lambda step, loss, grad_norm: seen.append((loss, grad_norm)),
            on_nan=lambda step, lm, aux: f"non-finite loss in router warm-up step {step}: lower router_warmup_lr",
        )
    return {
        "steps": steps,
        "seconds": res.seconds,
        "first_loss": seen[0][0],
        "last_loss": seen[-1][0],
        "grad_norm": round(seen[-1][1], 5),
        "metrics": res.metrics,
    }
