"""Router-logit similarity: one float64 GEMM (`router_similarity`) vs the paper's loop over expert pairs.

    .venv/bin/python benchmarks/bench_similarity.py [--quick]

Both functions get the same float32 logits tensor [N, Z] (what calibration collects). Timings interleave the two
methods: each round takes the best of `reps` calls of each, the table shows the median of those bests over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from smoe_lab.reduce import router_similarity, router_similarity_loop  # noqa: E402


def best_of(fn, H: torch.Tensor, reps: int) -> float:
    """Fastest of `reps` calls, in seconds."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(H)
        times.append(time.perf_counter() - start)
    return min(times)


def bench(N: int, Z: int, rounds: int, reps: int, seed: int = 0) -> dict:
    H = torch.randn(N, Z, generator=torch.Generator().manual_seed(seed))  # [N, Z] float32 logits
    gemm, loop = [], []
    for _ in range(rounds):  # interleaved, so drifting machine load hits both methods alike
        gemm.append(best_of(router_similarity, H, reps))
        loop.append(best_of(router_similarity_loop, H, reps))
    diff = (router_similarity(H) - router_similarity_loop(H)).abs().max().item()
    t_gemm, t_loop = statistics.median(gemm), statistics.median(loop)
    return {"N": N, "Z": Z, "gemm_ms": 1e3 * t_gemm, "loop_ms": 1e3 * t_loop, "speedup": t_loop / t_gemm, "diff": diff}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small case, few repetitions (seconds)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        cases, rounds, reps = [(4096, 32)], 3, 2
    else:
        cases, rounds, reps = [(N, Z) for N in (4096, 32768) for Z in (32, 128)], 5, 3
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median over {rounds} rounds of best-of-{reps}"
    )
    print(f"{'N':>7} {'Z':>5} {'gemm ms':>10} {'loop ms':>10} {'speedup':>9} {'max|diff|':>10}")
    for N, Z in cases:
        r = bench(N, Z, rounds, reps)
        times = f"{r['gemm_ms']:>10.3f} {r['loop_ms']:>10.1f}"
        print(f"{r['N']:>7} {r['Z']:>5} {times} {r['speedup']:>8.0f}x {r['diff']:>10.1e}")


if __name__ == "__main__":
    main()
