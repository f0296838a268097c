"""Notebook 01's stages: pretrain the variants (cached on their key), summarise runs, router-health tables.
Re-exported by smoe_lab.experiments (see its docstring for the caching rule)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .. import checkpoint
from ..data.corpus import resolve_corpus
from ..loop import read_metrics
from ..notebook_params import PretrainNotebook
from ..router_health import last_health, specialisation_warning
from ..train import pretrain, pretrain_key


def variant_label(num_experts: int) -> str:
    return "dense" if num_experts == 1 else f"{num_experts}e"


def _same_run(run_dir: Path, key: str) -> dict[str, Any] | None:
    """The meta of run_dir's checkpoint when it was made under this cache key, else None (also when unreadable)."""
    try:
        _, meta = checkpoint.read_config(run_dir / "checkpoint")
    except (FileNotFoundError, ValueError):
        return None
    return meta if meta.get("cache_key") == key else None


def _finished(run_dir: Path, model_cfg, train_cfg, corpus) -> bool:
    """True when run_dir holds a checkpoint at the last step made under this cache key (`train.pretrain_key`:
    the package source, both configs, the corpus's content)."""
    meta = _same_run(run_dir, pretrain_key(model_cfg, train_cfg, resolve_corpus(corpus).path))
    return meta is not None and meta.get("step") == train_cfg.max_steps


def _partial(run_dir: Path, model_cfg, train_cfg, corpus) -> bool:
    """A checkpoint of the same cache key that stopped early: resume it instead of starting again."""
    meta = _same_run(run_dir, pretrain_key(model_cfg, train_cfg, resolve_corpus(corpus).path))
    try:
        return meta is not None and checkpoint.load_train_state(run_dir / "checkpoint") is not None
    except ValueError:
        return False  # an unreadable train state: start again


def pretrain_variants(p: PretrainNotebook) -> pd.DataFrame:
    """Pretrain every variant on the same token budget; returns one row per model (the notebook's table)."""
    train_cfg = p.train_config()
    rows = []
    for e in p.variants:
        model_cfg = p.model_config(e)
        run_dir = Path(p.out_dir) / "pretrain" / f"{variant_label(e)}-s{p.seed}"
        if _finished(run_dir, model_cfg, train_cfg, p.corpus):
            print(f"{variant_label(e)}: up to date ({run_dir})")
        else:
            resume = _partial(run_dir, model_cfg, train_cfg, p.corpus)
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
        **_health_columns(metrics),
        "run_dir": str(run_dir),
    }


def _health_columns(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Router health at the end of a run (last evaluation): worst layer's entropy / ln E, mean top-1 gate, and the
    plain warning when a layer stayed above 0.8 ln E (smoe_lab.router_health)."""
    h = last_health(metrics)
    if not h:
        return {"entropy_ratio_max": float("nan"), "top1_gate_mean": float("nan"), "router_warning": ""}
    return {
        "entropy_ratio_max": max(h["entropy_ratio"]),
        "top1_gate_mean": round(sum(h["top1_gate"]) / len(h["top1_gate"]), 4),
        "router_warning": specialisation_warning(h["entropy_ratio"]) or "",
    }


def router_health_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (SMoE model, MoE layer): router health at the end of pretraining (last evaluation, validation
    data): entropy / ln E, mean top-1 gate, largest and smallest expert share, drop fraction (router_health)."""
    rows = []
    for r in table.itertuples():
        h = last_health(read_metrics(Path(r.run_dir) / "metrics.jsonl"))
        for layer in range(len(h.get("entropy_ratio", []))):
            rows.append({"model": r.model, "layer": layer, **{k: v[layer] for k, v in h.items()}})
    return pd.DataFrame(rows)


def load_curves(table: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    return {row.model: read_metrics(Path(row.run_dir) / "metrics.jsonl") for row in table.itertuples()}


def save_table(table: pd.DataFrame, out_dir: str | Path, name: str, markdown: str | None = None) -> dict[str, str]:
    """CSV + Markdown copies of a table under out_dir/tables (markdown: a rendering to use instead of the plain one)."""
    out = Path(out_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": str(out / f"{name}.csv"), "md": str(out / f"{name}.md")}
    table.to_csv(paths["csv"], index=False)
    Path(paths["md"]).write_text((markdown or table.to_markdown(index=False)) + "\n")
    return paths
