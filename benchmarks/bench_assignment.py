"""Linear assignment at UNCURL's size: scipy's linear_sum_assignment vs LAPJV (`lapjv` package) on d_ff x d_ff costs.

The alignment of two experts (smoe_lab.reduce.align) maximises sum_b C[perm[b], b]. This times, in interleaved
rounds on the same cost matrices, scipy (float64, exact) and smoe_lab's `_best_assignment` (LAPJV in float32 plus
the float64 dual certificate, scipy when the certificate fails), and checks that both reach the same objective.

    python benchmarks/bench_assignment.py            # 4096 x 4096 (d_ff of the 354M model), alignment + uniform costs
    python benchmarks/bench_assignment.py --quick    # 1024 x 1024, 2 rounds
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

try:
    from benchmarks._table import markdown_table, spread
except ImportError:  # run as a script: benchmarks/ is on sys.path, not its parent
    from _table import markdown_table, spread
from smoe_lab.reduce.align import ExpertWeights, _best_assignment, alignment_cost


def costs(kind: str, n: int, d_model: int, seed: int) -> np.ndarray:
    """alignment: the cost of two random GPT-2-init experts (d_model x n); uniform: U(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n, n, generator=g, dtype=torch.float64).numpy()
    mk = lambda: ExpertWeights(  # noqa: E731
        torch.randn(d_model, n, generator=g) * 0.02, torch.zeros(n), torch.randn(n, d_model, generator=g) * 0.02,
        torch.zeros(d_model),
    )  # fmt: skip
    return alignment_cost(mk(), mk()).numpy()


def scipy_perm(C: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(C, maximize=True)
    perm = np.empty_like(rows)
    perm[cols] = rows
    return perm


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="d_ff: the problem is n x n")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="n 1024, 2 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds = 1024, 2
    try:
        import lapjv  # noqa: F401

        solver = "lapjv + float64 certificate"
    except ImportError:
        solver = "scipy (lapjv not installed)"
    print(f"{args.n} x {args.n} assignment, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"smoe_lab solver: {solver}; seconds as median (min-max) over rounds\n")
    rows = []
    for kind in ("alignment", "uniform"):
        t: dict[str, list[float]] = {"scipy": [], "smoe_lab": []}
        same = True
        for r in range(args.rounds):  # round r: both solvers on cost matrix r, back to back
            C = costs(kind, args.n, args.d_model, seed=r)
            perms = {}
            for name, f in (("scipy", scipy_perm), ("smoe_lab", smoe_lab_perm)):
                t0 = time.perf_counter()
                perms[name] = f(C)
                t[name].append(time.perf_counter() - t0)
            same &= bool(np.isclose(obj(C, perms["scipy"]), obj(C, perms["smoe_lab"]), rtol=1e-12, atol=0))
        ratio = statistics.median(t["scipy"]) / statistics.median(t["smoe_lab"])
        rows.append([kind, spread(t["scipy"]), spread(t["smoe_lab"]), f"{ratio:.2f}", "yes" if same else "NO"])
    print(markdown_table(["costs", "scipy s", "smoe_lab s", "speedup", "same objective"], rows))


def smoe_lab_perm(C: np.ndarray) -> np.ndarray:
    return _best_assignment(torch.from_numpy(C)).numpy()


def obj(C: np.ndarray, perm: np.ndarray) -> float:
    return float(C[perm, np.arange(C.shape[0])].sum())


if __name__ == "__main__":
    main()
