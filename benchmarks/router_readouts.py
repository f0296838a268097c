"""Readouts without finetuning (smoe_lab.readouts) on the router sweep's models: does specialisation change what a
reduction keeps? For each recipe, notebook 03's readout stage (`readout_study`, params/03_pruning/quick.yaml: the 32e
model reduced to 8 experts by every method, merged routers) on the sweep's seed-0 models of the quick budget.

    python benchmarks/router_sweep.py --stage screen        # the models (runs/router_sweep/quick/<recipe>/...)
    python benchmarks/router_readouts.py paper lr20 --domains news
"""

from __future__ import annotations

import argparse
import sys
import warnings

from smoe_lab import paths
from smoe_lab.notebook_params import PruningNotebook
from smoe_lab.readout_study import readout_study

COLS = ["domain", "model", "method", "z", "d", "lm_loss", "vs_base", "drop_frac", "recon_routed", "recon_mapped"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--domains", nargs="+", default=["news"])
    ap.add_argument("--sweep", default=str(paths.runs_dir() / "router_sweep"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)  # the paper-recipe models warn about their routers (expected)
    for recipe in args.recipes:
        p = PruningNotebook.from_yaml(
            paths.params_dir() / "03_pruning" / "quick.yaml",
            out_dir=f"{args.sweep}/quick/{recipe}",
            readout_domains=args.domains,
        )
        df = readout_study(p)
        df["model"] = [m.split("-nall-")[-1] for m in df["model"]]  # short names: <method>-D<d>-<router>-s<seed>
        print(f"\n{recipe}:\n")
        print(df[[c for c in COLS if c in df.columns]].to_markdown(index=False, floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
