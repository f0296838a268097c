"""The report's figures: statistics from the results store's rows and the claims, drawn with smoe_lab.plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .. import plots
from ..plots import PALETTE
from .claims import Claim
from .stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, mean_sd
from .study import label, latest, protocols

VERDICT_COLORS = {SUPPORTED: "#2ca02c", NOT_SUPPORTED: "#d62728", INCONCLUSIVE: "#7f7f7f"}


def save_png(fig, out_dir: Path, name: str) -> str:
    """`name`.png in out_dir (no HTML: the report links static images); returns the file name."""
    return Path(plots.save_figure(fig, out_dir, name, scale=1.5, html=False)["png"]).name


def _by_d(values: pd.Series) -> list[tuple[int, float, float]]:
    """(d, mean, sd) per level "d" of a per-seed Series (sd 0 for one seed)."""
    return [(d, *mean_sd(v)) for d, v in values.groupby(level="d")]


def figure_pretrain(pre: pd.DataFrame, p):
    """Validation loss per variant (mean ± sd over seeds) under the paper's protocol and without drops."""
    fig = go.Figure()
    for i, proto in enumerate(protocols(p)[:2]):
        m = pre[pre["metric"] == f"val_loss:{proto.name}"]
        stats = [(d, *mean_sd(g["value"])) for d, g in m.groupby("d")]
        if not stats:
            continue
        d, mean, sd = zip(*stats)
        name = f"{proto.name}" + (" (paper protocol)" if i == 0 else "")
        marker = dict(size=10, color=PALETTE[i])
        fig.add_trace(plots.mean_sd_trace([label(x) for x in d], mean, sd, name, "markers+lines", marker=marker))
    return plots.white_layout(
        fig,
        "Pretraining validation loss (mean ± sd over seeds)",
        760,
        440,
        xaxis_title="experts per MoE layer (same active parameters)",
        yaxis_title="validation loss (nats)",
    )


def figure_protocols(gaps: pd.DataFrame):
    """MoE - dense validation loss per eval protocol, one bar group per MoE variant (`tables.protocol_gaps`)."""
    fig = go.Figure()
    for i, (model, g) in enumerate(gaps.groupby("model", sort=False)):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(plots.mean_sd_bars(g["protocol"], g["MoE - dense (nats)"], g["sd"].fillna(0), model, color))
    return plots.white_layout(
        plots.zero_line(fig),
        "Ablation: MoE - dense validation loss by eval protocol (below 0 = MoE better)",
        820,
        440,
        barmode="group",
        xaxis_title="eval protocol (capacity factor / eval batch size)",
        yaxis_title="MoE - dense (nats)",
    )


def figure_budget(gaps: pd.DataFrame):
    """MoE - dense validation loss vs tokens seen, one line per MoE variant (`tables.budget_gaps`)."""
    fig = go.Figure()
    for i, (model, g) in enumerate(gaps.groupby("model", sort=False)):
        line = dict(color=PALETTE[i % len(PALETTE)])
        fig.add_trace(plots.mean_sd_trace(g["tokens"], g["gap"], g["sd"].fillna(0), model, line=line))
    return plots.white_layout(
        plots.zero_line(fig),
        "Ablation: MoE - dense validation loss vs training tokens (below 0 = MoE better)",
        820,
        440,
        xaxis_title="tokens seen",
        yaxis_title="MoE - dense (nats, periodic eval)",
    )


def task_rows(df: pd.DataFrame, task: str, base: int, metric: str = "accuracy", stage: str = "stage2") -> pd.DataFrame:
    """One row per finetuned model and seed of `task` in plots.accuracy_vs_experts' layout: method ("none" for the
    models trained from scratch, the unreduced base included), z, d, the metric, n_eval and top_pred_share (from
    the store's extra, NaN where a row predates them)."""
    f = latest(df[(df["metric"] == metric) & (df["stage"] == stage) & (df["task"] == task)])
    f = f[(f["z"] == f["d"]) | (f["z"] == base)]
    extra = [json.loads(x or "{}") for x in f["extra_json"]] if "extra_json" in f else [{}] * len(f)
    return pd.DataFrame(
        {
            "task": task,
            "method": np.where(f["z"] == f["d"], "none", f["method"]),
            "z": f["z"].astype(int).to_numpy(),
            "d": f["d"].astype(int).to_numpy(),
            "seed": f["seed"].to_numpy(),
            metric: f["value"].astype(float).to_numpy(),
            "n_eval": [e.get("n_report", math.nan) for e in extra],
            "top_pred_share": [e.get("top_pred_share", math.nan) for e in extra],
        }
    )


def figure_task(df: pd.DataFrame, task: str, p):
    """Accuracy vs D per method (mean with its 95% t interval over seeds; Wilson for one seed), scratch models as
    stars, the base, chance and the majority class as lines, n in the title, one-answer models crossed out."""
    base = max(p.variants)
    rows = task_rows(df, task, base)
    floor = df[(df["stage"] == "floor") & (df["task"] == task)]
    chance = floor[floor["metric"] == "chance"]["value"].mean() if len(floor) else math.nan
    majority = floor[floor["metric"] == "majority"]["value"].mean() if len(floor) else math.nan
    seeds = rows["seed"].nunique() if len(rows) else 0
    ns = sorted({int(n) for n in rows["n_eval"].dropna()}) if len(rows) else []
    n_text = f"n={ns[0]}" if len(ns) == 1 else (f"n={ns[0]}-{ns[-1]}" if ns else "n unknown")
    fig = plots.accuracy_vs_experts(
        rows.assign(
            method=pd.Categorical(rows["method"], [m for m in [*p.methods, "none"] if m in set(rows["method"])])
        )
        if len(rows)
        else rows,
        task,
        chance=None if math.isnan(chance) else chance,
        majority=None if math.isnan(majority) else majority,
        title=f"{task}: accuracy after finetuning vs experts per layer<br><sup>validation, {n_text} examples, "
        f"{seeds} seed(s); bars: 95% t interval over seeds (Wilson for one seed)</sup>",
    )
    fig.update_xaxes(title_text="experts per MoE layer (D; 1 = dense)")
    return fig


def figure_claims(claims: list[Claim], k: float):
    """Forest plot: every part's pooled difference with its ±k SE interval (right of 0 = as the paper claims);
    pretraining parts (nats) on top, task parts (accuracy points) below."""
    rows = [(c.key, part) for c in claims for part in c.parts if part.est.n > 0]
    units = sorted({part.unit for _, part in rows}, key=lambda u: u != "nats") or ["accuracy points"]
    panels = []
    for unit in units:
        points = []
        for key, part in [x for x in rows if x[1].unit == unit]:
            se = part.est.se if math.isfinite(part.est.se) else 0.0
            points.append((f"({key}) {part.name}"[:75], part.est.mean, k * se, VERDICT_COLORS[part.verdict]))
        panels.append((f"oriented difference ({unit})", points))
    return plots.forest_plot(
        panels,
        f"Every comparison: pooled difference ± {k:g} SE (right of 0 = as claimed; green supported, "
        "red not supported, grey inconclusive)",
    )
