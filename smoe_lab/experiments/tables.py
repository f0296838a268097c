"""Notebook 04's stages: the pretraining runs, inference profiles and the paper's tables.
Re-exported by smoe_lab.experiments (see its docstring for the caching rule)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import checkpoint
from ..profile import model_latency, moe_layer_breakdown
from ..progress import report as progress_report
from ..results import accuracy_table
from .calibration import find_checkpoint, pretrain_dir
from .pretraining import save_table, summarize_run
from .pruning import results_store


# -- 04: tables, inference cost ------------------------------------------------------------------------------------
def pretrained_variants(out_dir: str | Path, seed: int = 0) -> list[str]:
    """Variant labels with a finished notebook-01 run under out_dir (dense first, then by expert count)."""
    root = Path(out_dir) / "pretrain"
    found = [p.name.rsplit("-s", 1)[0] for p in root.glob(f"*-s{seed}") if (p / "checkpoint" / "config.json").is_file()]
    return sorted(found, key=lambda v: 1 if v == "dense" else int(v.rstrip("e")))


def pretrain_runs(out_dir: str | Path, seed: int = 0) -> pd.DataFrame:
    """One summary row (summarize_run) per finished notebook-01 variant under out_dir."""
    return pd.DataFrame([summarize_run(pretrain_dir(out_dir, v, seed)) for v in pretrained_variants(out_dir, seed)])


def inference_profile(
    out_dir: str | Path,
    variants: list[str],
    seed: int = 0,
    batch_size: int = 1,
    seq_len: int | None = None,
    reps: int = 10,
) -> pd.DataFrame:
    """Per pretrained variant: validation loss (notebook 01), forward latency, and the MoE layer's time split."""
    import torch

    rows = []
    for v in variants:
        progress_report(f"latency of {v}: batch {batch_size}, {reps} timings")
        ckpt = find_checkpoint(out_dir, v, seed)
        model = checkpoint.load(ckpt)
        run = summarize_run(pretrain_dir(out_dir, v, seed))
        lat = model_latency(model, batch_size, seq_len, reps)
        row = {
            "model": v,
            "experts": max(model.config.experts_per_layer or [1]),
            "params": run["params"],
            "active_params": run["active_params"],
            "val_loss": run["val_loss"],
            **lat,
        }
        layers = model.moe_layers()
        if layers:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(lat["batch_size"] * lat["seq_len"], model.config.d_model, generator=g)
            parts = moe_layer_breakdown(layers[0], x, reps, spread=True)
            for k in [k for k in parts if not k.endswith(("_q25", "_q75"))]:  # median, then its quartiles
                row.update({f"moe_{k}_ms{q}": round(parts[k + q], 4) for q in ("", "_q25", "_q75")})
        rows.append(row)
    return pd.DataFrame(rows)


TABLES = {
    "table1_greedy_pruning": ["freq_prune"],
    "table2_uncurl": ["uncurl"],
    "table3_frequency_merge": ["uncurl", "freq_merge"],
    "table4_mcsmoe": ["uncurl", "mcsmoe"],
    "table5_hybrid": ["uncurl", "hybrid", "freq_prune"],
}


def paper_tables(out_dir: str | Path, tasks: list[str] | None = None, tables: dict[str, list[str]] | None = None):
    """The paper's Tables 1-4 (+ the hybrid) from the results store: name -> AccuracyTable; CSV + Markdown saved."""
    store = results_store(out_dir)
    df = store.rows(metric="accuracy")
    if df.empty:
        raise ValueError(f"the results store {store.path} holds no accuracy rows: run notebook 03 first")
    tasks = tasks or sorted(df["task"].unique())
    out = {}
    for name, methods in (tables or TABLES).items():
        present = [m for m in methods if m in set(df["method"])]
        if not present:
            continue
        t = accuracy_table(df, tasks, methods=present)
        save_table(t.to_frame(), out_dir, name, markdown=t.to_markdown())
        out[name] = t
    return out
