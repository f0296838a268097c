"""The report's figures (plotly), from the results store's rows and the claims."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..plots import PALETTE
from .claims import Claim
from .stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, mean_sd
from .study import label, protocols, task_frame


def save_png(fig, out_dir: Path, name: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.write_image(str(path), scale=1.5)
    return path.name


def figure_pretrain(pre: pd.DataFrame, p):
    fig = go.Figure()
    for i, proto in enumerate(protocols(p)[:2]):
        m = pre[pre["metric"] == f"val_loss:{proto.name}"]
        stats = [(d, *mean_sd(g["value"])) for d, g in m.groupby("d")]
        if not stats:
            continue
        d, mean, sd = zip(*stats)
        fig.add_trace(
            go.Scatter(
                x=[label(x) for x in d],
                y=mean,
                error_y=dict(type="data", array=sd),
                mode="markers+lines",
                name=f"{proto.name}" + (" (paper protocol)" if i == 0 else ""),
                marker=dict(size=10, color=PALETTE[i]),
            )
        )
    fig.update_layout(
        title="Pretraining validation loss (mean ± sd over seeds)",
        xaxis_title="experts per MoE layer (same active parameters)",
        yaxis_title="validation loss (nats)",
        template="plotly_white",
        width=760,
        height=440,
    )
    return fig


def figure_protocols(gaps: pd.DataFrame):
    fig = go.Figure()
    for i, (model, g) in enumerate(gaps.groupby("model", sort=False)):
        fig.add_trace(
            go.Bar(
                x=g["protocol"],
                y=g["MoE - dense (nats)"],
                error_y=dict(type="data", array=g["sd"].fillna(0)),
                name=model,
                marker_color=PALETTE[i % len(PALETTE)],
            )
        )
    fig.add_hline(y=0, line=dict(color="#444"))
    fig.update_layout(
        barmode="group",
        title="Ablation: MoE - dense validation loss by eval protocol (below 0 = MoE better)",
        xaxis_title="eval protocol (capacity factor / eval batch size)",
        yaxis_title="MoE - dense (nats)",
        template="plotly_white",
        width=820,
        height=440,
    )
    return fig


def figure_budget(gaps: pd.DataFrame):
    fig = go.Figure()
    for i, (model, g) in enumerate(gaps.groupby("model", sort=False)):
        fig.add_trace(
            go.Scatter(
                x=g["tokens"],
                y=g["gap"],
                error_y=dict(type="data", array=g["sd"].fillna(0)),
                mode="lines+markers",
                name=model,
                line=dict(color=PALETTE[i % len(PALETTE)]),
            )
        )
    fig.add_hline(y=0, line=dict(color="#444"))
    fig.update_layout(
        title="Ablation: MoE - dense validation loss vs training tokens (below 0 = MoE better)",
        xaxis_title="tokens seen",
        yaxis_title="MoE - dense (nats, periodic eval)",
        template="plotly_white",
        width=820,
        height=440,
    )
    return fig


def figure_task(df: pd.DataFrame, task: str, p):
    """Accuracy vs D per method (mean ± sd over seeds), scratch models as stars, base and majority floor as lines."""
    base = max(p.variants)
    acc = task_frame(df, base, "accuracy")
    fig = go.Figure()
    if task in acc.index.get_level_values("task"):
        t = acc.xs(task, level="task") * 100
        for i, method in enumerate([m for m in p.methods if m in t.columns]):
            s = t[method].dropna().groupby(level="d")
            stats = [(d, *mean_sd(v)) for d, v in s]
            if stats:
                d, mean, sd = zip(*stats)
                fig.add_trace(
                    go.Scatter(
                        x=d,
                        y=mean,
                        error_y=dict(type="data", array=sd),
                        mode="lines+markers",
                        name=method,
                        line=dict(color=PALETTE[i % len(PALETTE)]),
                    )
                )
        if "scratch" in t.columns:
            s = [(d, *mean_sd(v)) for d, v in t["scratch"].dropna().groupby(level="d")]
            ref = [x for x in s if x[0] != base]
            if ref:
                d, mean, sd = zip(*ref)
                fig.add_trace(
                    go.Scatter(
                        x=d,
                        y=mean,
                        error_y=dict(type="data", array=sd),
                        mode="markers",
                        name="trained from scratch",
                        marker=dict(symbol="star", size=14, color="black"),
                    )
                )
            top = [x for x in s if x[0] == base]
            if top:
                fig.add_hline(y=top[0][1], line=dict(dash="dash", color="#7f7f7f"), annotation_text=f"{base}e")
    floor = df[(df["stage"] == "floor") & (df["task"] == task) & (df["metric"] == "majority")]
    if len(floor):
        fig.add_hline(y=100 * floor["value"].mean(), line=dict(dash="dot", color="#bbbbbb"), annotation_text="majority")
    ticks = sorted(set(p.targets) | set(p.variants))
    fig.update_layout(
        title=f"{task}: accuracy after finetuning vs experts per layer (mean ± sd over seeds)",
        xaxis=dict(
            title="experts per MoE layer (D; 1 = dense)",
            type="log",
            tickvals=ticks,
            ticktext=["dense" if t == 1 else str(t) for t in ticks],
        ),
        yaxis_title="accuracy (%)",
        template="plotly_white",
        width=820,
        height=460,
    )
    return fig


def figure_claims(claims: list[Claim], k: float):
    """Forest plot: every part's pooled difference with its ±k SE interval (right of 0 = as the paper claims);
    pretraining parts (nats) on top, task parts (accuracy points) below."""
    colors = {SUPPORTED: "#2ca02c", NOT_SUPPORTED: "#d62728", INCONCLUSIVE: "#7f7f7f"}
    rows = [(c.key, part) for c in claims for part in c.parts if part.est.n > 0]
    units = sorted({part.unit for _, part in rows}, key=lambda u: u != "nats") or ["accuracy points"]
    counts = [max(1, sum(part.unit == u for _, part in rows)) for u in units]
    fig = make_subplots(rows=len(units), cols=1, row_heights=counts, vertical_spacing=0.12)
    for r, unit in enumerate(units, start=1):
        for key, part in [x for x in rows if x[1].unit == unit][::-1]:
            se = part.est.se if math.isfinite(part.est.se) else 0.0
            fig.add_trace(
                go.Scatter(
                    x=[part.est.mean],
                    y=[f"({key}) {part.name}"[:75]],
                    error_x=dict(type="data", array=[k * se]),
                    mode="markers",
                    marker=dict(size=11, color=colors[part.verdict]),
                    showlegend=False,
                ),
                row=r,
                col=1,
            )
        fig.add_vline(x=0, line=dict(color="#444"), row=r, col=1)
        fig.update_xaxes(title_text=f"oriented difference ({unit})", row=r, col=1)
    fig.update_layout(
        title=f"Every comparison: pooled difference ± {k:g} SE (right of 0 = as claimed; green supported, "
        "red not supported, grey inconclusive)",
        template="plotly_white",
        width=1000,
        height=200 + 40 * max(len(rows), 1),
        margin=dict(l=460),
        font=dict(size=11),
    )
    return fig
