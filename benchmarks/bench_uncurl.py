"""UNCURL at the paper's scale: a 354M-shaped SMoE (12 MoE layers, d_model 1024, d_ff 4096) reduced 64 -> 32 experts.

Every MoE layer of the model is reduced in turn, with random GPT-2-init expert weights and a planted router
(Z experts in D groups of nearly equal router columns, so the clusters are real): similarity (one GEMM over N
router-logit rows), eigendecomposition, k-means, alignment of every non-centre expert to its centre (d_ff x d_ff
assignment problems: the dominant cost) and the frequency-weighted merge. Alignment and merge run at each worker
count on the same plan. Layers are generated and reduced one at a time, so peak memory is one layer's experts
(64 x 2 x 1024 x 4096 fp32 = 2.1 GB) plus the merged ones, not the whole model's 26 GB. Peak RSS is measured per
stage (Linux: the high-water mark is reset before each stage).

Calibration tokens/s is measured on the same model shape with `--calib-layers` MoE blocks (a whole 24-block
model with 64 experts in 12 layers holds 6.4 G parameters, more than this machine's memory) and extrapolated
to the full depth by the block count (a forward's cost is linear in the number of blocks).

    python benchmarks/bench_uncurl.py                         # 12 layers, workers 1, 2 and all cores
    python benchmarks/bench_uncurl.py --layers 3 --workers 1 2  # a subset of the layers; totals extrapolated to 12
    python benchmarks/bench_uncurl.py --quick                 # 2 layers of d_model 256, d_ff 1024 (CI smoke run)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch

try:
    from benchmarks._table import markdown_table
except ImportError:  # run as a script: benchmarks/ is on sys.path, not its parent
    from _table import markdown_table
from smoe_lab.calibrate import calibrate
from smoe_lab.config import ModelConfig
from smoe_lab.model import GPT
from smoe_lab.reduce import router_similarity
from smoe_lab.reduce.align import ExpertWeights
from smoe_lab.reduce.methods import merge_groups, plan_uncurl


class PeakRSS:
    """Peak resident memory (MB) of this process since the last reset (Linux /proc; NaN elsewhere)."""

    @staticmethod
    def reset() -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass

    @staticmethod
    def read() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


def planted_layer(z: int, d: int, d_model: int, d_ff: int, n_tokens: int, seed: int = 0):
    """Z experts in D groups (router columns nearly equal within a group) + router logits H [N, Z]."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.arange(z) % d
    rows = torch.randn(d, d_model, generator=g)
    router = rows[groups] + 0.05 * torch.randn(z, d_model, generator=g)  # [Z, d_model]
    H = torch.randn(n_tokens, d_model, generator=g) @ router.T  # [N, Z]
    experts = [
        ExpertWeights(
            torch.randn(d_model, d_ff, generator=g) * 0.02,
            torch.zeros(d_ff),
            torch.randn(d_ff, d_model, generator=g) * 0.02,
            torch.zeros(d_model),
        )
        for _ in range(z)
    ]
    freq = torch.bincount(H.argmax(1), minlength=z).double().numpy() / n_tokens
    return H, experts, freq


def timed(stage: str, seconds: dict, peak: dict, fn, *fn_args):
    PeakRSS.reset()
    t0 = time.perf_counter()
    out = fn(*fn_args)
    seconds[stage] += time.perf_counter() - t0
    peak[stage] = max(peak[stage], PeakRSS.read())
    return out


def reduce_layers(args) -> tuple[dict, dict, int]:
    """Seconds (summed over layers) and peak RSS per stage; alignment/merge per worker count."""
    seconds, peak = defaultdict(float), defaultdict(float)
    n_align = 0
    for layer in range(args.layers):
        shape = (args.experts, args.target, args.d_model, args.d_ff, args.tokens, layer)
        H, experts, freq = timed("generate", seconds, peak, planted_layer, *shape)
        S = np.asarray(timed("similarity", seconds, peak, router_similarity, H))
        plan = timed("plan", seconds, peak, plan_uncurl, S, freq, args.target)
        for k, v in plan.seconds.items():  # eigen, kmeans: the plan's own split
            seconds[k] += v
            peak[k] = peak["plan"]
        n_align += int(sum(np.sum(plan.labels == k) - 1 for k in range(args.target)))
        for w in args.workers:
            PeakRSS.reset()
            merged, t_align, t_merge = merge_groups(experts, freq, plan, w)
            del merged  # the reduced layer is not kept: memory stays one layer's worth
            seconds[f"align w={w}"] += t_align
            seconds[f"merge w={w}"] += t_merge
            peak[f"align+merge w={w}"] = max(peak[f"align+merge w={w}"], PeakRSS.read())
        del experts, H
        so_far = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
        print(f"  layer {layer + 1}/{args.layers} done; seconds so far: {so_far}", file=sys.stderr, flush=True)
    return seconds, peak, n_align


def calibration_speed(args) -> tuple[float, float, int]:
    """(tokens/s on a --calib-layers-MoE-block model, peak RSS MB, its block count)."""
    n_layer = 2 * args.calib_layers
    cfg = ModelConfig.preset(
        "gpt2-354m", n_layer=n_layer, num_experts=args.experts, d_model=args.d_model, d_ff=args.d_ff,
        n_head=args.d_model // 64, block_size=args.calib_seq,
    )  # fmt: skip
    model = GPT(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.calib_batch, args.calib_seq), generator=g) for _ in range(3)]
    calibrate(model, batches[:1])  # warm-up
    PeakRSS.reset()
    t0 = time.perf_counter()
    calibrate(model, batches[1:])
    dt = time.perf_counter() - t0
    return 2 * args.calib_batch * args.calib_seq / dt, PeakRSS.read(), n_layer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="MoE layers to reduce (the 354M model has 12)")
    ap.add_argument("--full-layers", type=int, default=12, help="MoE layers of the model the totals extrapolate to")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--target", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32768, help="router-logit rows per layer for the similarity")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1, 2 and all cores")
    ap.add_argument("--calib-layers", type=int, default=1, help="MoE blocks of the calibration model (0: skip)")
    ap.add_argument("--calib-batch", type=int, default=2)
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="2 layers, d_model 256, d_ff 1024, 8192 rows")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.full_layers, args.d_model, args.d_ff, args.tokens = 2, 2, 256, 1024, 8192
        args.calib_seq = 128
    args.workers = sorted(set(args.workers or [1, 2, os.cpu_count() or 2]))
    print(
        f"UNCURL {args.experts} -> {args.target} experts per layer, {args.layers} of {args.full_layers} MoE layers "
        f"reduced, d_model {args.d_model}, d_ff {args.d_ff}, {args.tokens} router-logit rows per layer, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores, workers {args.workers}\n"
    )
    seconds, peak, n_align = reduce_layers(args)
    scale = args.full_layers / args.layers
    rows = []
    stages = ["generate", "similarity", "eigen", "kmeans"] + [
        f"{s} w={w}" for w in args.workers for s in ("align", "merge")
    ]
    for stage in stages:
        mem = peak.get(stage, peak.get("align+merge w=" + stage.split("w=")[-1], float("nan")))
        sec = seconds[stage]
        rows.append([stage, f"{sec:.2f}", f"{sec / args.layers:.2f}", f"{sec * scale:.1f}", f"{mem:.0f}"])
    header = ["stage", "s (measured)", "s per layer", f"s for {args.full_layers} layers", "peak RSS MB"]
    print(markdown_table(header, rows))
    print(
        f"\n{n_align} alignments ({args.d_ff} x {args.d_ff}) in {args.layers} layers; 'generate' is the benchmark's own"
    )
    w1, wn = args.workers[0], args.workers[-1]
    for w in args.workers:
        total = sum(seconds[s] for s in ("similarity", "eigen", "kmeans", f"align w={w}", f"merge w={w}"))
        print(
            f"UNCURL reduction, workers={w}: {total:.1f} s measured, "
            f"{total * scale:.0f} s for {args.full_layers} layers"
        )
    if wn != w1:
        print(f"alignment speedup {wn} vs {w1} workers: {seconds[f'align w={w1}'] / seconds[f'align w={wn}']:.2f}x")
    if args.calib_layers > 0:
        tps, mem, blocks = calibration_speed(args)
        full = 2 * args.full_layers
        print(
            f"calibration: {tps:.0f} tokens/s on {blocks} blocks ({args.calib_layers} MoE, {args.experts} experts), "
            f"peak RSS {mem:.0f} MB; about {tps * blocks / full:.0f} tokens/s on the {full}-block model (scaled by"
            " the block count; the LM head's fixed cost makes this a lower bound)"
        )


if __name__ == "__main__":
    main()
