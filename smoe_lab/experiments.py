"""Notebook-level stages: each notebook cell calls one of these and draws what it returns.

Stages are idempotent: a variant whose finished checkpoint exists with the same model and training config is
not retrained (so `smoe-lab run` can skip work that is up to date, and an interrupted run resumes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from . import checkpoint
from .notebook_params import PretrainNotebook
from .train import pretrain, read_metrics


def variant_label(num_experts: int) -> str:
    return "dense" if num_experts == 1 else f"{num_experts}e"


def _finished(run_dir: Path, model_cfg, train_cfg) -> bool:
    """True when run_dir holds a checkpoint at the last step made with exactly these configs."""
    try:
        cfg, meta = checkpoint.read_config(run_dir / "checkpoint")
    except FileNotFoundError:
        return False
    return (
        cfg == model_cfg and meta.get("train_config") == train_cfg.to_dict() and meta.get("step") == train_cfg.max_steps
    )


def _partial(run_dir: Path, model_cfg, train_cfg) -> bool:
    """A checkpoint of the same configs that stopped early: resume it instead of starting again."""
    try:
        cfg, meta = checkpoint.read_config(run_dir / "checkpoint")
    except FileNotFoundError:
        return False
    same = cfg == model_cfg and meta.get("train_config") == train_cfg.to_dict()
    return same and checkpoint.load_train_state(run_dir / "checkpoint") is not None


def pretrain_variants(p: PretrainNotebook) -> pd.DataFrame:
    """Pretrain every variant on the same token budget; returns one row per model (the notebook's table)."""
    train_cfg = p.train_config()
    rows = []
    for e in p.variants:
        model_cfg = p.model_config(e)
        run_dir = Path(p.out_dir) / "pretrain" / f"{variant_label(e)}-s{p.seed}"
        if _finished(run_dir, model_cfg, train_cfg):
            print(f"{variant_label(e)}: up to date ({run_dir})")
        else:
            resume = _partial(run_dir, model_cfg, train_cfg)
            pretrain(model_cfg, train_cfg, p.corpus, run_dir, resume=resume, progress=p.progress)
        rows.append(summarize_run(run_dir))
    table = pd.DataFrame(rows)
    return table


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """One table row from a pretraining run folder: sizes, budget, final losses, time."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    metrics = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in metrics if r["kind"] == "train"]
    evals = [r for r in metrics if r["kind"] == "eval"]
    tps = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    return {
        "model": meta["label"],
        "params": meta["params"],
        "active_params": meta["active_params"],
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
        "train_loss": train[-1]["loss"],
        "val_loss": evals[-1]["val_loss"] if evals else float("nan"),
        "tokens_per_s": round(sum(tps) / len(tps), 1),
        "drop_frac_last": (sum(train[-1]["drop_frac"]) / len(train[-1]["drop_frac"]))
        if "drop_frac" in train[-1]
        else 0.0,
        "run_dir": str(run_dir),
    }


def load_curves(table: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    return {row.model: read_metrics(Path(row.run_dir) / "metrics.jsonl") for row in table.itertuples()}


def save_table(table: pd.DataFrame, out_dir: str | Path, name: str) -> dict[str, str]:
    """CSV + Markdown copies of a table under out_dir/tables."""
    out = Path(out_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": str(out / f"{name}.csv"), "md": str(out / f"{name}.md")}
    table.to_csv(paths["csv"], index=False)
    Path(paths["md"]).write_text(table.to_markdown(index=False) + "\n")
    return paths
