"""The study's settings derived from the parameters, and reading its results store.

Every stage writes rows into one append-only results store under out_dir/replication; a rerun of the same (model,
task, stage, seed, metric) supersedes earlier rows (`latest`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import experiments
from ..paths import resolve_out_dir
from ..results import ResultsStore

PRETRAIN_TASK = "corpus:val"  # the results-store task of pretraining losses
RUN_TASK = "run"  # the results-store task of bookkeeping rows (wall seconds per stage)


def label(num_experts: int) -> str:
    return experiments.variant_label(num_experts)


@dataclass(frozen=True)
class Protocol:
    """How a pretraining loss is measured: every validation window in stream order, batches of batch_size."""

    name: str
    capacity_factor: float
    drop_tokens: bool
    batch_size: int


def protocols(p) -> list[Protocol]:
    """The paper's protocol first (capacity factor 1.0 with drops), then no drops, then the ablation protocols."""
    b = p.eval_batch_size
    out = [Protocol(f"cf1/b{b}", 1.0, True, b), Protocol(f"nodrop/b{b}", 1.0, False, b)]
    out += [Protocol(f"cf{c:g}/b{b}", float(c), True, b) for c in p.ablation_capacity_factors if c != 1.0]
    out += [Protocol(f"cf1/b{s}", 1.0, True, s) for s in p.ablation_batch_sizes if s != b]
    return out


def report_path(p) -> Path:
    return resolve_out_dir(p.report) if p.report else Path(p.study_dir) / "replication.md"


def load_store(p) -> ResultsStore:
    return experiments.results_store(p.study_dir)


def record_wall(store: ResultsStore, p, stage: str, seconds: float) -> None:
    """A bookkeeping row: the wall seconds of one execution of a stage (`tables.compute_used` sums them)."""
    store.append(
        base_model=p.backbone,
        method="none",
        z=1,
        d=1,
        task=RUN_TASK,
        stage=stage,
        seed=0,
        metric="wall_seconds",
        value=float(seconds),
    )


_KEYS = ["base_model", "method", "z", "d", "task", "stage", "seed", "metric"]


def latest(df: pd.DataFrame) -> pd.DataFrame:
    """A rerun of the same (model, task, stage, seed, metric) supersedes earlier rows (the store is append-only)."""
    return df.sort_values("id").groupby(_KEYS, as_index=False).tail(1) if len(df) else df


def pretrain_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Latest pretraining rows: columns seed, d (expert count), metric, value."""
    df = latest(df[(df["task"] == PRETRAIN_TASK) & (df["stage"] == "pretrain")])
    return df[["seed", "d", "metric", "value", "extra_json"]].reset_index(drop=True)


def task_frame(df: pd.DataFrame, base: int, metric: str = "accuracy", stage: str = "stage2") -> pd.DataFrame:
    """Task results of one stage ("stage2": after finetuning; "zeroshot": the ablation without finetuning): index
    (task, d, seed), one column per model kind: "scratch" (z == d: trained from scratch, incl. the unreduced base at
    d = base) or the reduction method (reduced from `base`)."""
    df = latest(df[(df["metric"] == metric) & (df["stage"] == stage)])
    df = df[(df["z"] == df["d"]) | (df["z"] == base)]
    if df.empty:
        return pd.DataFrame(columns=[], index=pd.MultiIndex.from_tuples([], names=["task", "d", "seed"]))
    kind = np.where(df["z"] == df["d"], "scratch", df["method"])
    return df.assign(kind=kind).pivot_table(index=["task", "d", "seed"], columns="kind", values="value", aggfunc="last")


def latest_curve(df: pd.DataFrame) -> pd.DataFrame:
    c = df[(df["task"] == PRETRAIN_TASK) & (df["stage"] == "curve")]
    if c.empty:
        return c.assign(tokens=[])
    tokens = [json.loads(x or "{}").get("tokens") for x in c["extra_json"]]
    c = c.assign(tokens=tokens).sort_values("id")
    return c.groupby(["seed", "d", "tokens"], as_index=False).tail(1)
