"""Training throughput: tokens/s and peak memory of dense vs SMoE variants (forward + backward + AdamW step).

Interleaved rounds (every variant once per round, the order rotated), best step time per round; the table gives
the median over rounds with the min-max in brackets. The goal from the performance issue: the 8-expert model at
>= 0.85 x the dense model's tokens/s. Peak memory: CUDA max_memory_allocated per variant (its own steps); on CPU
the process's peak RSS after all variants (one number, since CPU memory is not tracked per variant).

    python benchmarks/bench_train.py                  # tiny preset, batch 32 x 128, variants 1 8 32
    python benchmarks/bench_train.py --quick
    python benchmarks/bench_train.py --preset gpt2-354m --variants 1 8 --batch-size 8 --block-size 1024 --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import torch

try:
    from benchmarks._table import markdown_table
except ImportError:  # run as a script: benchmarks/ is on sys.path, not its parent
    from _table import markdown_table
from smoe_lab.config import ModelConfig, TrainConfig
from smoe_lab.model import GPT
from smoe_lab.train import make_optimizer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--variants", type=int, nargs="+", default=[1, 8, 32], help="experts per MoE layer (1: dense)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=None, help="sequence length (default: the preset's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.reps = 3, 2
    device = torch.device(args.device)
    overrides = {} if args.block_size is None else {"block_size": args.block_size}
    runs = {}
    for e in args.variants:
        cfg = ModelConfig.preset(args.preset, num_experts=e, **overrides)
        model = GPT(cfg, seed=0).to(device).train()
        for layer in model.moe_layers():
            layer.record_logits = False
        opt = make_optimizer(model, TrainConfig(lr=1e-4, micro_batch_size=args.batch_size, batch_size=args.batch_size))
        idx = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), device=device)
        runs["dense" if e == 1 else f"{e}e"] = (model, opt, idx)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def step(model, opt, idx):
        with ctx:
            _, loss, aux = model(idx, idx)
        (loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    peak = {}
    for k, r in runs.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step(*r)  # warm-up (optimizer state allocated)
        sync()
        if device.type == "cuda":
            peak[k] = torch.cuda.max_memory_allocated(device) / 2**20
    times = {k: [] for k in runs}
    names = list(runs)
    for i in range(args.rounds):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            best = float("inf")
            for _ in range(args.reps):
                sync()
                t0 = time.perf_counter()
                step(*runs[k])
                sync()
                best = min(best, time.perf_counter() - t0)
            times[k].append(best)
    tokens = args.batch_size * next(iter(runs.values()))[2].shape[1]
    if device.type != "cuda":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak = dict.fromkeys(runs, rss)
    base = statistics.median(times["dense"]) if "dense" in times else None
    print(
        f"preset {args.preset}, batch {args.batch_size} x {tokens // args.batch_size}, {device}, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads; "
        f"median (min-max) over {args.rounds} interleaved rounds of best-of-{args.reps} steps\n"
    )
    rows = []
    for k, t in times.items():
        tps = [tokens / v for v in t]
        rel = f"{base / statistics.median(t):.2f}" if base else "-"
        mem = f"{peak[k]:.0f}" + ("" if device.type == "cuda" else " (process)")
        tps_cell = f"{statistics.median(tps):.0f} ({min(tps):.0f}-{max(tps):.0f})"
        rows.append([k, f"{1000 * statistics.median(t):.1f}", tps_cell, rel, mem])
    print(markdown_table(["model", "ms/step", "tokens/s", "x dense", "peak MB"], rows))


if __name__ == "__main__":
    main()
