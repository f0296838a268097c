"""The report's figures of the readouts without finetuning and of router health (mean ± sd over seeds)."""

from __future__ import annotations

import plotly.graph_objects as go

from .. import plots
from ..plots import PALETTE
from ..router_health import WARN_ENTROPY_RATIO
from .stats import mean_sd
from .study import READOUT_PREFIX, health_frame, label, readout_frame, reconstruction_layers


def _by_d(values) -> list[tuple[int, float, float]]:
    return [(int(d), *mean_sd(v)) for d, v in values.groupby(level="d")]


def figure_readout_loss(df, domain: str, p):
    """Zero-shot LM loss on the domain's validation stream minus the unreduced base's (paired by seed), vs D: one
    line per reduction method, the scratch models with D experts as stars (mean ± sd over seeds)."""
    base = max(p.variants)
    lm = readout_frame(df, base, "lm_loss")
    task = f"{READOUT_PREFIX}{domain}"
    fig = go.Figure()
    if task in lm.index.get_level_values("task"):
        t = lm.xs(task, level="task")
        ref = t.xs(base, level="d")["scratch"] if base in t.index.get_level_values("d") else None
        if ref is not None:
            diff = t.sub(ref, axis=0, level="seed")
            diff = diff[diff.index.get_level_values("d") != base]
            for i, m in enumerate([m for m in p.methods if m in diff.columns]):
                stats = _by_d(diff[m].dropna())
                if stats:
                    d, mean, sd = zip(*stats)
                    line = dict(color=PALETTE[i % len(PALETTE)])
                    fig.add_trace(plots.mean_sd_trace(d, mean, sd, m, line=line))
            if "scratch" in diff.columns:
                stats = _by_d(diff["scratch"].dropna())
                if stats:
                    d, mean, sd = zip(*stats)
                    star = dict(symbol="star", size=14, color="black")
                    fig.add_trace(plots.mean_sd_trace(d, mean, sd, "trained from scratch", "markers", marker=star))
    fig.add_hline(y=0, line=dict(dash="dash", color="#7f7f7f"), annotation_text=f"{label(base)} unreduced")
    ticks = sorted(set(p.targets) | set(p.variants))
    return plots.white_layout(
        fig,
        f"{domain}: zero-shot LM loss after reduction, no finetuning, minus the unreduced {label(base)}'s "
        "(mean ± sd over seeds)",
        860,
        460,
        xaxis=plots.experts_axis("experts per MoE layer (D; 1 = dense)", ticks),
        yaxis_title="LM loss - unreduced (nats)",
    )


def figure_reconstruction(df, domain: str, p):
    """Per-layer output reconstruction error (mean over MoE layers, ± sd over seeds) vs D per method: the experts'
    weights through the base router ("mapped", solid) and the reduced layer with its own merged router ("routed",
    dotted)."""
    rec = reconstruction_layers(df, max(p.variants))
    rec = rec[rec["domain"] == domain]
    fig = go.Figure()
    for i, m in enumerate([m for m in p.methods if m in set(rec["method"])]):
        g = rec[rec["method"] == m].groupby(["d", "seed"])[["mapped", "routed"]].mean()
        color = PALETTE[i % len(PALETTE)]
        for kind, dash in (("mapped", "solid"), ("routed", "dot")):
            stats = _by_d(g[kind])
            d, mean, sd = zip(*stats)
            style = dict(line=dict(color=color, dash=dash), legendgroup=m)
            fig.add_trace(plots.mean_sd_trace(d, mean, sd, f"{m} ({kind})", **style))
    fig.add_hline(y=1, line=dict(dash="dot", color="#bbbbbb"), annotation_text="1 = as far off as dropping the layer")
    return plots.white_layout(
        fig,
        f"{domain}: reconstruction error of the reduced MoE layers (mean over layers, ± sd over seeds)",
        860,
        460,
        xaxis=plots.experts_axis("experts per MoE layer after reduction (D)", sorted(set(p.targets))),
        yaxis_title="sum ||y_reduced - y_base||² / sum ||y_base||²",
    )


def figure_router_health(df):
    """Router entropy / ln E per MoE layer at the end of pretraining, per SMoE variant (mean ± sd over seeds), with
    the 0.8 ln E warning line."""
    h = health_frame(df)
    h = h[h["field"] == "entropy_ratio"]
    fig = go.Figure()
    for i, (layer, g) in enumerate(h.groupby("layer")):
        stats = [(int(e), *mean_sd(v["value"])) for e, v in g.groupby("d")]
        e, mean, sd = zip(*stats)
        bars = plots.mean_sd_bars([label(x) for x in e], mean, sd, f"MoE layer {layer}", PALETTE[i % len(PALETTE)])
        fig.add_trace(bars)
    fig.add_hline(y=WARN_ENTROPY_RATIO, line=dict(dash="dot", color="#d62728"), annotation_text="warning: 0.8 ln E")
    return plots.white_layout(
        fig,
        "Router entropy / ln E at the end of pretraining (validation windows; mean ± sd over seeds)",
        820,
        420,
        barmode="group",
        xaxis_title="model",
        yaxis=dict(title="entropy / ln E (1 = uniform)", range=[0, 1.05]),
    )
