"""Training throughput of the tiny preset: tokens/s of dense vs SMoE variants (forward + backward + AdamW step).

Interleaved rounds (every variant once per round), best step time per round, median over rounds. The goal from
the performance issue: the 8-expert model at >= 0.85 x the dense model's tokens/s.

    python benchmarks/bench_train.py                  # tiny preset, batch 32 x 128, variants 1 8 32
    python benchmarks/bench_train.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from smoe_lab.config import ModelConfig, TrainConfig
from smoe_lab.model import GPT
from smoe_lab.train import make_optimizer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--variants", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.reps = 3, 2
    runs = {}
    for e in args.variants:
        cfg = ModelConfig.preset(args.preset, num_experts=e)
        model = GPT(cfg, seed=0).train()
        for layer in model.moe_layers():
            layer.record_logits = False
        opt = make_optimizer(model, TrainConfig(lr=1e-4, micro_batch_size=args.batch_size, batch_size=args.batch_size))
        idx = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size))
        runs["dense" if e == 1 else f"{e}e"] = (model, opt, idx)

    def step(model, opt, idx):
        _, loss, aux = model(idx, idx)
        (loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for r in runs.values():
        step(*r)
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, r in runs.items():
            best = float("inf")
            for _ in range(args.reps):
                t0 = time.perf_counter()
                step(*r)
                best = min(best, time.perf_counter() - t0)
            times[k].append(best)
    tokens = args.batch_size * next(iter(runs.values()))[2].shape[1]
    base = tokens / statistics.median(times["dense"]) if "dense" in times else None
    shape = f"batch {args.batch_size} x {tokens // args.batch_size}"
    print(f"preset {args.preset}, {shape}, {torch.get_num_threads()} threads; median of {args.rounds} rounds")
    print(f"{'model':<8} {'ms/step':>9} {'tokens/s':>10} {'x dense':>8}")
    for k, t in times.items():
        tps = tokens / statistics.median(t)
        print(f"{k:<8} {1000 * statistics.median(t):>9.1f} {tps:>10.0f} {tps / base if base else float('nan'):>8.2f}")


if __name__ == "__main__":
    main()
