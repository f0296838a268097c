"""The inference-cost figures (notebook 04): loss vs latency per expert count, the MoE layer's all-to-all vs
expert compute, router health curves."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from ..router_health import WARN_ENTROPY_RATIO
from .core import PALETTE, iqr_error


# -- inference cost ------------------------------------------------------------------------------------------------
def latency_note(profile) -> str:
    """'batch 1 x 128 tokens, cpu (2 threads), median of 10 timings' from an inference_profile table."""
    if not len(profile) or "batch_size" not in profile:
        return ""
    r = profile.iloc[0]
    text = f"batch {int(r['batch_size'])} x {int(r['seq_len'])} tokens"
    if "device" in profile:
        text += f", {r['device']}" + (f" ({int(r['threads'])} threads)" if "threads" in profile else "")
    if "reps" in profile:
        text += f", median of {int(r['reps'])} timings (bars: IQR)"
    return text


def loss_vs_latency(profile, title: str = "Validation loss vs inference latency per expert count (Fig 2a)"):
    """The paper's Fig 2a: validation loss vs forward latency, one point per expert count (bars: IQR of timings)."""
    fig = go.Figure(
        go.Scatter(
            x=profile["latency_ms"],
            y=profile["val_loss"],
            error_x=iqr_error(profile, "latency_ms"),
            mode="markers+text+lines",
            text=profile["model"],
            textposition="top center",
            marker=dict(size=12, color=PALETTE[0]),
        )
    )
    note = latency_note(profile)
    fig.update_layout(
        title=title + (f"<br><sup>{note}</sup>" if note else ""),
        xaxis_title="forward latency, whole model (ms)",
        yaxis_title="validation LM loss (nats)",
        template="plotly_white",
        width=760,
        height=460,
    )
    return fig


def moe_breakdown_bars(profile) -> go.Figure:
    """Time split of one MoE layer per expert count (cf. the paper's Figs 4-5); bars: IQR of each stage's timings."""
    parts = [c for c in profile.columns if c.startswith("moe_") and c.endswith("_ms")]
    df = profile.dropna(subset=parts) if parts else profile.iloc[0:0]
    fig = go.Figure()
    for i, c in enumerate(parts):
        fig.add_trace(
            go.Bar(
                x=df["model"], y=df[c], name=c[4:-3], marker_color=PALETTE[i % len(PALETTE)], error_y=iqr_error(df, c)
            )
        )
    note = latency_note(profile)
    fig.update_layout(
        barmode="stack",
        title="Where the time of the first MoE layer goes (forward, eval mode, one process)"
        + (f"<br><sup>{note}</sup>" if note else ""),
        yaxis_title="ms (median per stage)",
        template="plotly_white",
        width=760,
        height=460,
    )
    return fig


# -- router health (smoe_lab.router_health) -------------------------------------------------------------------------
def router_health_curves(
    curves: dict[str, list[dict[str, Any]]], key: str = "entropy_ratio", kind: str = "train", data: str = ""
) -> go.Figure:
    """Router health vs tokens seen: one line per (model, MoE layer), from metrics.jsonl rows. key: entropy_ratio
    (with the 0.8 warning line and 1 = uniform), top1_gate, max_share, min_share or drop_frac. data: for the
    subtitle (what the models trained on)."""
    fig = go.Figure()
    dashes = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
    for i, (label, rows) in enumerate(curves.items()):
        pts = [(r["tokens"], r[key]) for r in rows if r.get("kind") == kind and key in r]
        if not pts:
            continue
        x = [p[0] for p in pts]
        for layer in range(len(pts[0][1])):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[p[1][layer] for p in pts],
                    mode="lines",
                    name=f"{label} · MoE layer {layer}",
                    line=dict(color=PALETTE[i % len(PALETTE)], dash=dashes[layer % len(dashes)]),
                )
            )
    titles = {
        "entropy_ratio": "Router entropy / ln E (1 = uniform)",
        "top1_gate": "Mean top-1 gate (1/E = uniform)",
        "max_share": "Largest expert's token share",
        "min_share": "Smallest expert's token share",
        "drop_frac": "Dropped token share",
    }
    if key == "entropy_ratio":
        fig.add_hline(y=WARN_ENTROPY_RATIO, line=dict(color="#7f7f7f", dash="dot"), annotation_text="warning 0.8")
        fig.update_yaxes(range=[0, 1.05])
    fig.update_layout(
        title=f"{titles.get(key, key)} vs tokens seen"
        + (f"<br><sup>{data}; {'training' if kind == 'train' else 'validation'} batches</sup>" if data else ""),
        xaxis_title="tokens seen",
        yaxis_title=key,
        template="plotly_white",
        legend_title="model · layer",
        width=760,
        height=460,
    )
    return fig
