"""Every reduction method at several targets from ONE calibration artifact: seconds per stage.

    python benchmarks/bench_methods.py --checkpoint runs/quickstart/pretrain/32e-s0/checkpoint --task boolq \
        --max-examples 512 --targets 16 8 4

Calibrates once (the artifact is reused by every method and every D: its calibrate time is paid once), then runs
uncurl, freq_prune, freq_merge, mcsmoe, random and hybrid at each target and prints the per-stage seconds
(similarity, eigen, k-means, align, merge), the experts per layer after reduction and the parameter count.
"""

from __future__ import annotations

import argparse
import time

from smoe_lab import checkpoint
from smoe_lab.calibrate import calibrate
from smoe_lab.data.tasks import calibration_batches, load_task
from smoe_lab.reduce import METHODS, reduce_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--task", default="boolq")
    ap.add_argument("--max-examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--targets", type=int, nargs="+", default=[16, 8, 4])
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    model = checkpoint.load(args.checkpoint)
    tok = checkpoint.load_tokenizer(args.checkpoint)
    examples = load_task(args.task, "train", max_examples=args.max_examples)
    t0 = time.perf_counter()
    cal = calibrate(model, calibration_batches(tok, examples, args.batch_size, model.config.block_size))
    t_cal = time.perf_counter() - t0
    print(
        f"calibration: {cal.manifest['tokens']:,} tokens of {args.task}/train in {t_cal:.2f}s "
        f"(experts per layer {cal.experts_per_layer}); reused below"
    )
    stages = ["similarity", "eigen", "kmeans", "align", "merge", "total"]
    print(f"{'method':<11} {'D':>3} " + " ".join(f"{s:>10}" for s in stages) + f" {'experts/layer':>14} {'params':>10}")
    for d in args.targets:
        for method in METHODS:
            new, report = reduce_model(model, method, d, cal, workers=args.workers)
            secs = " ".join(f"{report.seconds[s]:>10.3f}" for s in stages)
            print(f"{method:<11} {d:>3} {secs} {str(report.num_experts):>14} {new.num_params():>10,}")
    print(f"unreduced: {model.num_params():,} parameters")


if __name__ == "__main__":
    main()
