"""Inference-cost profile: forward latency per model and the time split inside one MoE layer.

The paper's question is an inference-cost question (Fig 2a: validation loss vs latency per expert count; Figs 4-5:
where the time of an MoE layer goes). `model_latency` times a whole forward pass; `moe_layer_breakdown` times the
stages of one MoE layer (router, routing, dispatch, expert compute, combine) on the same input. Single process:
there is no all-to-all here (expert parallelism is a DeepSpeed matter), so that column is absent, not zero.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .moe import MoELayer, combine, dispatch, plan_dispatch, top1_route


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() over reps calls after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def model_latency(model, batch_size: int = 1, seq_len: int | None = None, reps: int = 10, seed: int = 0) -> dict:
    """Forward latency (eval mode, eval capacity factor) of a batch of random token ids -> ms and tokens/s."""
    device = next(model.parameters()).device
    t = seq_len or model.config.block_size
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (batch_size, t), generator=g).to(device)
    was = model.training
    model.eval()
    s = time_call(lambda: model(idx), device, reps)
    model.train(was)
    return {"latency_ms": 1000 * s, "tokens_per_s": batch_size * t / s, "batch_size": batch_size, "seq_len": t}


@torch.no_grad()
def moe_layer_breakdown(layer: MoELayer, x: torch.Tensor, reps: int = 10) -> dict[str, float]:
    """Milliseconds per stage of one MoE layer's forward on x [N, d_model] (eval mode)."""
    device = x.device
    was = layer.training
    layer.eval()
    logits = layer.router(x)
    r = top1_route(logits, layer.capacity_factor, layer.min_capacity, layer.drop_tokens)
    plan = plan_dispatch(r, layer.num_experts)
    xb = dispatch(x, r, plan)
    yb = layer.experts.forward_padded(xb)
    out = {
        "router": time_call(lambda: layer.router(x), device, reps),
        "routing": time_call(
            lambda: top1_route(logits, layer.capacity_factor, layer.min_capacity, layer.drop_tokens), device, reps
        ),
        "dispatch": time_call(lambda: dispatch(x, r, plan_dispatch(r, layer.num_experts)), device, reps),
        "experts": time_call(lambda: layer.experts.forward_padded(xb), device, reps),
        "combine": time_call(lambda: combine(yb, r, plan), device, reps),
    }
    layer.train(was)
    return {k: 1000 * v for k, v in out.items()}
