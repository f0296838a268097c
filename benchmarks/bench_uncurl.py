"""UNCURL on one GPT-2-medium-shaped MoE layer: seconds per stage, and the parallel-alignment speedup.

A layer of Z experts (d_model 1024, d_ff 4096 by default: GPT-2 medium / the paper's 354M backbone) with planted
router structure is reduced to D experts: similarity (one GEMM over N router-logit rows), eigendecomposition,
k-means, Hungarian alignment of every non-centre expert to its centre (d_ff x d_ff assignment problems: the
dominant cost), and the frequency-weighted merge. Alignment runs with 1 and with --workers workers on the same
plan, and the speedup is printed.

    python benchmarks/bench_uncurl.py                 # Z=64 -> D=32, d_model 1024, d_ff 4096 (about 2 GB of weights)
    python benchmarks/bench_uncurl.py --quick         # d_model 256, d_ff 1024
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from smoe_lab.reduce import router_similarity
from smoe_lab.reduce.align import ExpertWeights
from smoe_lab.reduce.methods import merge_groups, plan_uncurl


def planted_layer(z: int, d: int, d_model: int, d_ff: int, n_tokens: int, seed: int = 0):
    """Z experts in D groups (router columns nearly equal within a group) + router logits H [N, Z]."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.arange(z) % d
    rows = torch.randn(d, d_model, generator=g)
    router = rows[groups] + 0.05 * torch.randn(z, d_model, generator=g)  # [Z, d_model]
    x = torch.randn(n_tokens, d_model, generator=g)
    H = x @ router.T  # [N, Z]
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--target", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.d_model, args.d_ff, args.tokens = 256, 1024, 8192
    print(
        f"Z={args.experts} -> D={args.target}, d_model {args.d_model}, d_ff {args.d_ff}, {args.tokens} calibration "
        f"tokens, {torch.get_num_threads()} threads"
    )
    H, experts, freq = planted_layer(args.experts, args.target, args.d_model, args.d_ff, args.tokens)
    t0 = time.perf_counter()
    S = np.asarray(router_similarity(H))
    t_sim = time.perf_counter() - t0
    plan = plan_uncurl(S, freq, args.target)
    stages = {"similarity": t_sim, **plan.seconds}
    timings = {}
    for workers in (1, args.workers):
        t0 = time.perf_counter()
        merged, t_align, t_merge = merge_groups(experts, freq, plan, workers)
        timings[workers] = (t_align, t_merge, time.perf_counter() - t0)
    n_align = int(sum(np.sum(plan.labels == k) - 1 for k in range(args.target)))
    print(f"{'stage':<12} {'seconds':>10}")
    for k, v in stages.items():
        print(f"{k:<12} {v:>10.3f}")
    for w, (ta, tm, _) in timings.items():
        print(f"{'align':<12} {ta:>10.3f}   ({n_align} Hungarian problems of {args.d_ff}x{args.d_ff}, workers={w})")
        print(f"{'merge':<12} {tm:>10.3f}   (workers={w})")
    a1, aw = timings[1][0], timings[args.workers][0]
    print(f"parallel alignment speedup with {args.workers} workers: {a1 / aw:.2f}x")


if __name__ == "__main__":
    main()
