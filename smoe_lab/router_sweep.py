"""Router-recipe sweeps: pretrain the same model under several router recipes, seeds and expert counts, and read
off router health beside validation loss. What docs/routers.md's tables come from (benchmarks/router_sweep.py).

A recipe is a `router_recipe` mapping of notebook 01 (ModelConfig / TrainConfig router fields, {} = the paper's
settings). Each (budget, recipe, experts, seed) is one notebook-01 pretraining run under
out_dir/<budget>/<recipe>/pretrain/<label>-s<seed> (finished runs are skipped, interrupted ones resume) and one
CSV row, appended as soon as it exists, so an interrupted sweep loses at most the run in progress.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd

from . import experiments
from .loop import read_metrics
from .notebook_params import PretrainNotebook
from .router_health import FIELDS, last_health, specialisation_warning

COLUMNS = ["budget", "recipe", "recipe_json", "experts", "seed", "steps", "tokens", "val_loss", "train_loss"]
COLUMNS += [f"{k}_{agg}" for k in FIELDS for agg in ("mean", "max", "min")] + ["entropy_ratio_layers", "seconds"]


def final_health(run_dir: str | Path) -> dict[str, list[float]]:
    """Per-layer router health of a pretraining run's last evaluation (`router_health.last_health`)."""
    return last_health(read_metrics(Path(run_dir) / "metrics.jsonl"))


def run_point(
    base: PretrainNotebook, budget: str, name: str, recipe: dict[str, Any], experts: int, seed: int, out_dir: str | Path
) -> dict[str, Any]:
    """Pretrain one model (skipped when finished) and return its CSV row."""
    p = base.replace(router_recipe=recipe, variants=[experts], seed=seed, out_dir=str(Path(out_dir) / budget / name))
    t0 = time.perf_counter()
    summary = experiments.pretrain_variants(p).iloc[0].to_dict()
    health = final_health(summary["run_dir"])
    row: dict[str, Any] = {
        "budget": budget,
        "recipe": name,
        "recipe_json": json.dumps(recipe, sort_keys=True),
        "experts": experts,
        "seed": seed,
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "val_loss": summary["val_loss"],
        "train_loss": summary["train_loss"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    for k in FIELDS:
        vals = health.get(k) or [float("nan")]
        row[f"{k}_mean"] = round(sum(vals) / len(vals), 4)
        row[f"{k}_max"], row[f"{k}_min"] = max(vals), min(vals)
    row["entropy_ratio_layers"] = " ".join(f"{v:.3f}" for v in health.get("entropy_ratio", []))
    return row


def done_keys(csv_path: Path) -> set[tuple]:
    if not csv_path.is_file():
        return set()
    df = pd.read_csv(csv_path)
    return {(r.budget, r.recipe, int(r.experts), int(r.seed)) for r in df.itertuples()}


def append_row(csv_path: Path, row: dict[str, Any]) -> None:
    new = not csv_path.is_file()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in COLUMNS})


def run_sweep(
    budgets: dict[str, PretrainNotebook],
    recipes: dict[str, dict[str, Any]],
    grid: list[tuple[str, str, int, int]],
    out_dir: str | Path,
    csv_path: str | Path,
    log=print,
) -> pd.DataFrame:
    """Run every (budget, recipe, experts, seed) of `grid` not yet in csv_path (in grid order); returns the CSV.

    budgets: name -> the notebook-01 settings of that budget (tokens, lr, schedule); recipes: name -> router_recipe.
    experts 1 is the dense reference (its recipe is irrelevant: name it "paper").
    """
    csv_path = Path(csv_path)
    done = done_keys(csv_path)
    for budget, name, experts, seed in grid:
        if (budget, name, experts, seed) in done | done_keys(csv_path):  # another worker may have run it meanwhile
            continue
        if budget not in budgets or name not in recipes:
            raise ValueError(f"grid point {(budget, name, experts, seed)}: unknown budget or recipe")
        row = run_point(budgets[budget], budget, name, recipes[name], experts, seed, out_dir)
        append_row(csv_path, row)
        done.add((budget, name, experts, seed))
        log(
            f"{budget:8s} {name:22s} {experts:3d}e s{seed}: val {row['val_loss']:.4f}  entropy/lnE "
            f"{row['entropy_ratio_layers']}  gate {row['top1_gate_mean']:.2f}  ({row['seconds']:.0f}s)"
        )
    return pd.read_csv(csv_path)


def _mean_sd(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return ""
    sd = v.std(ddof=1) if len(v) > 1 else float("nan")
    return f"{v.mean():.3f}" + ("" if math.isnan(sd) else f" ± {sd:.3f}")


def _paired(g: pd.DataFrame, ref: pd.Series, key) -> pd.Series:
    """val_loss of each run of g minus the reference run with the same key (nan where there is none)."""
    return pd.Series([r.val_loss - ref.get(key(r), float("nan")) for r in g.itertuples()], dtype=float)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (budget, recipe, experts): seeds, mean ± sd over seeds of val loss, its paired difference to the
    paper's settings (same budget, experts and seed) and to the dense model (same budget and seed) where those were
    run, worst-layer entropy / ln E, mean top-1 gate, smallest / largest expert share, drop fraction."""
    paper = df[df["recipe"] == "paper"].set_index(["budget", "experts", "seed"])["val_loss"]
    dense = df[df["experts"] == 1].set_index(["budget", "seed"])["val_loss"]
    rows = []
    for (budget, recipe, experts), g in df.groupby(["budget", "recipe", "experts"], sort=False):
        moe = experts > 1
        vs_paper = _paired(g, paper, lambda r: (r.budget, r.experts, r.seed))
        vs_dense = _paired(g, dense, lambda r: (r.budget, r.seed))
        rows.append(
            {
                "budget": budget,
                "recipe": recipe,
                "experts": int(experts),
                "seeds": " ".join(str(int(s)) for s in sorted(g["seed"])),
                "val_loss": _mean_sd(g["val_loss"]),
                "vs paper": _mean_sd(vs_paper) if moe and recipe != "paper" else "",
                "vs dense": _mean_sd(vs_dense) if moe else "",
                "entropy/lnE (worst layer)": _mean_sd(g["entropy_ratio_max"]) if moe else "",
                "top-1 gate": _mean_sd(g["top1_gate_mean"]) if moe else "",
                "min share": _mean_sd(g["min_share_min"]) if moe else "",
                "max share": _mean_sd(g["max_share_max"]) if moe else "",
                "dropped": _mean_sd(g["drop_frac_mean"]) if moe else "",
                "<= 0.5 ln E": ("yes" if bool((g["entropy_ratio_max"] <= 0.5).all()) else "no") if moe else "",
            }
        )
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    key = out["recipe"].ne("paper").astype(int)  # within a budget and size: the paper's settings first
    out = out.assign(_k=key).sort_values(["budget", "experts", "_k"], kind="stable").drop(columns="_k")
    if dense.empty:
        out = out.drop(columns="vs dense")
    return out.reset_index(drop=True)


def unspecialised(df: pd.DataFrame) -> list[str]:
    """Warnings for every swept MoE model that ended above 0.8 ln E in some layer."""
    out = []
    for r in df[df["experts"] > 1].itertuples():
        msg = specialisation_warning([float(x) for x in str(r.entropy_ratio_layers).split()])
        if msg:
            out.append(f"{r.budget}/{r.recipe}/{r.experts}e-s{r.seed}: {msg}")
    return out
