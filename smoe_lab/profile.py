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


def time_calls(fn: Callable[[], object], device: torch.device, reps: int = 10, warmup: int = 2) -> list[float]:
    """Seconds of each of reps calls of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_call(fn: Callable[[], object], device: torch.device, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() over reps calls after warm-up."""
    return statistics.median(time_calls(fn, device, reps, warmup))


def quartiles(times: list[float]) -> tuple[float, float, float]:
    """(q25, median, q75) of repeated timings (the median alone for fewer than 2)."""
    if len(times) < 2:
        m = statistics.median(times)
        return m, m, m
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], q[1], q[2]


@torch.no_grad()
def model_latency(model, batch_size: int = 1, seq_len: int | None = None, reps: int = 10, seed: int = 0) -> dict:
    """Forward latency (eval mode, eval capacity factor) of a batch of random token ids -> ms and tokens/s."""
    device = next(model.parameters()).device
    t = seq_len or model.config.block_size
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (batch_size, t), generator=g).to(device)
    was = model.training
    model.eval()
    q25, s, q75 = quartiles(time_calls(lambda: model(idx), device, reps))
    model.train(was)
    return {
        "latency_ms": 1000 * s,
        "latency_ms_q25": 1000 * q25,
        "latency_ms_q75": 1000 * q75,
        "tokens_per_s": batch_size * t / s,
        "batch_size": batch_size,
        "seq_len": t,
        "reps": reps,
        "device": device.type,
        "threads": torch.get_num_threads(),
    }


@torch.no_grad()
def moe_layer_breakdown(layer: MoELayer, x: torch.Tensor, reps: int = 10, spread: bool = False) -> dict[str, float]:
    """Median milliseconds per stage of one MoE layer's forward on x [N, d_model] (eval mode); spread=True adds
    each stage's quartiles of the reps timings as "<stage>_q25" / "<stage>_q75"."""
    device = x.device
    was = layer.training
    layer.eval()
    logits = layer.router(x)
    r = top1_route(logits, layer.capacity_factor, layer.min_capacity, layer.drop_tokens)
    plan = plan_dispatch(r, layer.num_experts)
    xb = dispatch(x, r, plan)
    yb = layer.experts.forward_padded(xb)
    times = {
        "router": time_calls(lambda: layer.router(x), device, reps),
        "routing": time_calls(
            lambda: top1_route(logits, layer.capacity_factor, layer.min_capacity, layer.drop_tokens), device, reps
        ),
        "dispatch": time_calls(lambda: dispatch(x, r, plan_dispatch(r, layer.num_experts)), device, reps),
        "experts": time_calls(lambda: layer.experts.forward_padded(xb), device, reps),
        "combine": time_calls(lambda: combine(yb, r, plan), device, reps),
    }
    layer.train(was)
    out = {}
    for k, ts in times.items():
        q25, med, q75 = quartiles(ts)
        out[k] = 1000 * med
        if spread:
            out[f"{k}_q25"], out[f"{k}_q75"] = 1000 * q25, 1000 * q75
    return out
