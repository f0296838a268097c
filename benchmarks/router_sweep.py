"""Router recipes on a CPU budget: which options make top-1 routers specialise, and what they cost in LM loss.

Pretrains the tiny preset (8e and 32e) on the `quick` budget of notebook 01
(params/01_pretrain/quick.yaml: 600k tokens, 147 steps) and the pretraining budget of the science run
(params/05_replication/science.yaml: 1.2M tokens, 293 steps), under several router recipes and seeds. Every finished
run appends one row to the CSV (router health of the last evaluation, validation loss), so an interrupted sweep
resumes where it stopped; finished runs are never retrained. docs/routers.md's tables are this script's output:

    OMP_NUM_THREADS=1 nice python benchmarks/router_sweep.py                      # every stage (~1.5 h, 1 core)
    python benchmarks/router_sweep.py --stage screen                               # stage 1 only
    python benchmarks/router_sweep.py --stage seeds --shard 1/2                    # every 2nd point, from the 2nd
    python benchmarks/router_sweep.py --summary                                    # print the tables from the CSV

Stages (each a list of (budget, recipe, experts, seed), run in this order; the CPU time of this machine, shared by
several people, did not allow the full factorial grid):
    screen   quick budget, seed 0, 32 experts (the harder case): each option alone, three router lr multipliers,
             two combinations
    seeds    quick budget, seeds 0-2: the chosen recipe and the paper's settings at 32e and 8e (paired by seed)
    science  science budget: the chosen recipe at 32e and 8e, seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from smoe_lab import paths
from smoe_lab.notebook_params import PretrainNotebook, ReplicationNotebook
from smoe_lab.router_sweep import run_sweep, summarize, unspecialised

# name -> router_recipe (ModelConfig / TrainConfig router fields); "paper" = the paper's settings.
RECIPES = {
    "paper": {},
    "lr10": {"router_lr_mult": 10.0, "router_weight_decay": 0.0},
    "lr30": {"router_lr_mult": 30.0, "router_weight_decay": 0.0},
    "lr10_wd": {"router_lr_mult": 10.0},
    "init0.2": {"router_init_std": 0.2},
    "init0.2_lr10": {"router_init_std": 0.2, "router_lr_mult": 10.0, "router_weight_decay": 0.0},
    "zloss": {"router_z_loss_coef": 1e-3},
    "jitter": {"router_jitter": 1e-2},
    "aux0.001": {"aux_loss_coef": 0.001},
    "lr10_aux0.001": {"router_lr_mult": 10.0, "router_weight_decay": 0.0, "aux_loss_coef": 0.001},
    "lr20": {"router_lr_mult": 20.0, "router_weight_decay": 0.0},
    "lr15": {"router_lr_mult": 15.0, "router_weight_decay": 0.0},
    "lr20_aux0.1": {"router_lr_mult": 20.0, "router_weight_decay": 0.0, "aux_loss_coef": 0.1},
    "lr20_zloss": {"router_lr_mult": 20.0, "router_weight_decay": 0.0, "router_z_loss_coef": 1e-3},
    "lr30_zloss": {"router_lr_mult": 30.0, "router_weight_decay": 0.0, "router_z_loss_coef": 1e-3},
}
# Stage 1 screens every option alone (and two combinations) on the harder case, 32 experts, seed 0.
SCREEN = ["paper", "lr10", "lr20", "lr30", "init0.2", "zloss", "jitter", "aux0.001"]
# after the choice, two candidates against lr20's drops (imbalance at high router lr): more balancing, a larger init
SCREEN += ["lr20_aux0.1", "init0.2_lr10"]
# The rule fixed before the seeds stage: the smallest router lr multiplier of the screen whose 32e model ends with
# every MoE layer at <= 0.5 ln E (a stronger push costs LM loss, the probe says). lr10: 0.70 / 0.62; lr20:
# 0.16 / 0.24 -> lr20.
CHOSEN = "lr20"


def budgets(eval_batches: int = 16) -> dict[str, PretrainNotebook]:
    """The two budgets as notebook-01 settings (paper router settings; the recipe is set per run). Evaluation: 16
    batches of 32 x 128 validation tokens (the quick set's; evaluation does not change training)."""
    quick = PretrainNotebook.from_yaml(paths.params_dir() / "01_pretrain" / "quick.yaml", router_recipe={})
    sci = ReplicationNotebook.from_yaml(paths.params_dir() / "05_replication" / "science.yaml", router_recipe={})
    science = sci.pretrain_notebook(0).replace(eval_batches=eval_batches, progress=False)
    return {"quick": quick.replace(eval_batches=eval_batches, progress=False), "science": science}


def grid(stage: str) -> list[tuple[str, str, int, int]]:
    if stage == "screen":
        return [("quick", "paper", 8, 0)] + [("quick", r, 32, 0) for r in SCREEN]
    if stage == "seeds":
        return [("quick", r, e, s) for s in (0, 1, 2) for r in (CHOSEN, "paper") for e in (32, 8)]
    if stage == "science":
        return [("science", CHOSEN, 32, 0), ("science", CHOSEN, 8, 0)]
    raise ValueError(f"unknown stage {stage!r}; known: screen, seeds, science")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", nargs="+", default=["screen", "seeds", "science"])
    ap.add_argument("--out", default=str(paths.runs_dir() / "router_sweep"))
    ap.add_argument("--csv", default=None, help="default: OUT/router_sweep.csv")
    ap.add_argument("--summary", action="store_true", help="only print the tables of the CSV")
    ap.add_argument("--shard", default="0/1", help="I/N: run every N-th grid point from the I-th (parallel workers)")
    ap.add_argument("--points", default="", help="explicit points budget:recipe:experts:seed,... (instead of stages)")
    args = ap.parse_args(argv)
    csv_path = Path(args.csv or Path(args.out) / "router_sweep.csv")
    i, n = (int(v) for v in args.shard.split("/"))
    if not args.summary:
        b = budgets()
        stages = [[tuple(pt.split(":")) for pt in args.points.split(",")]] if args.points else map(grid, args.stage)
        for pts in stages:
            pts = [(bud, rec, int(e), int(s)) for bud, rec, e, s in pts]
            run_sweep(b, RECIPES, pts[i::n], args.out, csv_path, log=lambda s: print(s, flush=True))
    df = pd.read_csv(csv_path)
    pd.set_option("display.width", 200)
    print(summarize(df).to_markdown(index=False))
    for w in unspecialised(df):
        print("warning:", w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
