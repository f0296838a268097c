"""The report's figures: statistics from the results store's rows and the claims, drawn with smoe_lab.plots."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from .. import plots
from ..plots import PALETTE
from .claims import Claim
from .stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, mean_sd
from .study import label, protocols, task_frame

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


def figure_task(df: pd.DataFrame, task: str, p):
    """Accuracy vs D per method (mean ± sd over seeds), scratch models as stars, base and majority floor as lines."""
    base = max(p.variants)
    acc = task_frame(df, base, "accuracy")
    fig = go.Figure()
    if task in acc.index.get_level_values("task"):
        t = acc.xs(task, level="task") * 100
        for i, method in enumerate([m for m in p.methods if m in t.columns]):
            stats = _by_d(t[method].dropna())
            if stats:
                d, mean, sd = zip(*stats)
                fig.add_trace(plots.mean_sd_trace(d, mean, sd, method, line=dict(color=PALETTE[i % len(PALETTE)])))
        if "scratch" in t.columns:
            s = _by_d(t["scratch"].dropna())
            ref = [x for x in s if x[0] != base]
            if ref:
                d, mean, sd = zip(*ref)
                star = dict(symbol="star", size=14, color="black")
                fig.add_trace(plots.mean_sd_trace(d, mean, sd, "trained from scratch", "markers", marker=star))
            top = [x for x in s if x[0] == base]
            if top:
                fig.add_hline(y=top[0][1], line=dict(dash="dash", color="#7f7f7f"), annotation_text=f"{base}e")
    floor = df[(df["stage"] == "floor") & (df["task"] == task) & (df["metric"] == "majority")]
    if len(floor):
        fig.add_hline(y=100 * floor["value"].mean(), line=dict(dash="dot", color="#bbbbbb"), annotation_text="majority")
    ticks = sorted(set(p.targets) | set(p.variants))
    return plots.white_layout(
        fig,
        f"{task}: accuracy after finetuning vs experts per layer (mean ± sd over seeds)",
        820,
        460,
        xaxis=plots.experts_axis("experts per MoE layer (D; 1 = dense)", ticks),
        yaxis_title="accuracy (%)",
    )


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
