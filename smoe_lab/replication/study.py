"""The study's settings derived from the parameters, and reading its results store.

Every stage writes rows into one append-only results store under out_dir/replication; a rerun of the same (model,
task, stage, seed, metric) supersedes earlier rows (`latest`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import experiments
from ..paths import resolve_out_dir
from ..results import ResultsStore

PRETRAIN_TASK = "corpus:val"  # the results-store task of pretraining losses
RUN_TASK = "run"  # the results-store task of bookkeeping rows (wall seconds per stage)
HEALTH_STAGE = "router"  # router health of each pretrained SMoE (stage of task PRETRAIN_TASK)
READOUT_STAGE = "zeroshot"  # the readouts without finetuning (smoe_lab.readout_study), tasks "corpus:val_<domain>"
READOUT_PREFIX = "corpus:val_"


def health_metric(field: str, layer: int) -> str:
    """The results-store metric of one router-health field of one MoE layer: "entropy_ratio:L0"."""
    return f"{field}:L{layer}"


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


def health_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Latest router-health rows of the pretrained models: columns seed, d (expert count), field, layer, value."""
    h = latest(df[(df["task"] == PRETRAIN_TASK) & (df["stage"] == HEALTH_STAGE)])
    if h.empty:
        return pd.DataFrame(columns=["seed", "d", "field", "layer", "value"])
    parts = h["metric"].str.rsplit(":L", n=1, expand=True)
    out = h.assign(field=parts[0], layer=parts[1].astype(int))[["seed", "d", "field", "layer", "value"]]
    return out.reset_index(drop=True)


def readout_domains(df: pd.DataFrame) -> list[str]:
    """The domains with readout rows in the store (task "corpus:val_<domain>", stage "zeroshot")."""
    t = df[(df["stage"] == READOUT_STAGE) & df["task"].str.startswith(READOUT_PREFIX)]["task"]
    return sorted(x.removeprefix(READOUT_PREFIX) for x in set(t))


def readout_frame(df: pd.DataFrame, base: int, metric: str = "lm_loss") -> pd.DataFrame:
    """The readouts without finetuning in `task_frame`'s layout: index (task = "corpus:val_<domain>", d, seed), one
    column per model kind ("scratch": the pretrained model with d experts, incl. the unreduced base at d = base; else
    the reduction method). metric: "lm_loss", "drop_frac", "recon_routed" or "recon_mapped" (reductions only)."""
    r = df[df["task"].str.startswith(READOUT_PREFIX)]
    return task_frame(r, base, metric, READOUT_STAGE)


def reconstruction_layers(df: pd.DataFrame, base: int) -> pd.DataFrame:
    """Per-layer reconstruction errors of the reductions: columns domain, method, d, seed, layer, routed, mapped."""
    r = df[df["task"].str.startswith(READOUT_PREFIX) & (df["z"] == base) & (df["d"] < base)]
    r = latest(r[(r["stage"] == READOUT_STAGE) & (r["metric"] == "recon_mapped")])
    rows = []
    for x in r.itertuples(index=False):
        extra = json.loads(x.extra_json or "{}")
        routed, mapped = extra.get("recon_routed_layers") or [], extra.get("recon_mapped_layers") or []
        for layer, (a, b) in enumerate(zip(routed, mapped)):
            domain = x.task.removeprefix(READOUT_PREFIX)
            rows.append(
                dict(domain=domain, method=x.method, d=int(x.d), seed=int(x.seed), layer=layer, routed=a, mapped=b)
            )
    return pd.DataFrame(rows, columns=["domain", "method", "d", "seed", "layer", "routed", "mapped"])


def threshold_keep(base: int) -> int:
    """The largest reduction factor Z/D that keeps UNCURL's advantage over scratch in the paper: 4 for Z <= 32
    (32e -> 8e fine, 32e -> 4e not), 2 beyond (128e: beyond 2x worse)."""
    return 4 if base <= 32 else 2


def threshold_factors(p) -> list[dict[str, Any]]:
    """Claim (d)'s factors: one entry per target D (largest first): factor Z/D, the side of the paper's threshold
    ("keeps" / "loses") and whether a scratch model with D experts exists (else the factor is untested)."""
    base = max(p.variants)
    keep = threshold_keep(base)
    out = []
    for d in sorted(p.targets, reverse=True):
        f = base / d
        out.append({"d": d, "factor": f, "side": "keeps" if f <= keep else "loses", "tested": d in p.variants})
    return out
