"""Plotly figures used by the notebooks and the replication report, and the building blocks they share (house
layout, mean ± sd traces, reference lines, forest plot). Every figure can be saved as HTML + PNG with `save_figure`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from .router_health import WARN_ENTROPY_RATIO

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def save_figure(
    fig: go.Figure, out_dir: str | Path, name: str, png: bool = True, scale: float = 2.0, html: bool = True
) -> dict[str, str]:
    """Write `name`.html (self-contained, interactive; unless html=False) and `name`.png (static, via kaleido;
    unless png=False) under out_dir. Returns the paths written by kind ("html", "png")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if html:
        paths["html"] = str(out / f"{name}.html")
        # plotly.js is embedded (~3.5 MB) so the HTML opens offline, e.g. on a GPU node without internet.
        fig.write_html(paths["html"], include_plotlyjs=True, full_html=True)
    if png:
        paths["png"] = str(out / f"{name}.png")
        fig.write_image(paths["png"], scale=scale)
    return paths


# -- building blocks: mean ± sd over seeds, reference lines, the shared layout -------------------------------------
def white_layout(fig: go.Figure, title: str, width: int, height: int, **layout: Any) -> go.Figure:
    """The house style: plotly_white, a title and a fixed size (other layout properties as keywords)."""
    fig.update_layout(title=title, template="plotly_white", width=width, height=height, **layout)
    return fig


def mean_sd_trace(x, mean, sd, name: str, mode: str = "lines+markers", **style: Any) -> go.Scatter:
    """Points (and lines) at `mean` with ±`sd` error bars (style: marker=..., line=...)."""
    return go.Scatter(x=x, y=mean, error_y=dict(type="data", array=sd), mode=mode, name=name, **style)


def mean_sd_bars(x, mean, sd, name: str, color: str) -> go.Bar:
    """Bars at `mean` with ±`sd` error bars."""
    return go.Bar(x=x, y=mean, error_y=dict(type="data", array=sd), name=name, marker_color=color)


def zero_line(fig: go.Figure) -> go.Figure:
    """A horizontal line at y = 0 (differences: above / below it)."""
    fig.add_hline(y=0, line=dict(color="#444"))
    return fig


def experts_axis(title: str, ticks: list[int]) -> dict[str, Any]:
    """A log x axis over expert counts, tick 1 labelled "dense"."""
    return dict(title=title, type="log", tickvals=ticks, ticktext=["dense" if t == 1 else str(t) for t in ticks])


def forest_plot(
    panels: list[tuple[str, list[tuple[str, float, float, str]]]],
    title: str,
    width: int = 1000,
    label_margin: int = 460,
) -> go.Figure:
    """One point ± half-width per row, in stacked panels (one per unit), a vertical line at 0 in each.

    panels: (x-axis title, rows) top to bottom; a row is (label, x, half-width, colour), drawn top to bottom in the
    given order. Panel heights follow their row counts.
    """
    from plotly.subplots import make_subplots

    counts = [max(1, len(rows)) for _, rows in panels]
    fig = make_subplots(rows=len(panels), cols=1, row_heights=counts, vertical_spacing=0.12)
    for r, (axis_title, rows) in enumerate(panels, start=1):
        for text, x, err, color in rows[::-1]:
            fig.add_trace(
                go.Scatter(
                    x=[x],
                    y=[text],
                    error_x=dict(type="data", array=[err]),
                    mode="markers",
                    marker=dict(size=11, color=color),
                    showlegend=False,
                ),
                row=r,
                col=1,
            )
        fig.add_vline(x=0, line=dict(color="#444"), row=r, col=1)
        fig.update_xaxes(title_text=axis_title, row=r, col=1)
    n_rows = sum(len(rows) for _, rows in panels)
    height = 200 + 40 * max(n_rows, 1)
    return white_layout(fig, title, width, height, margin=dict(l=label_margin), font=dict(size=11))


def loss_curves(curves: dict[str, list[dict[str, Any]]], kind: str = "train", key: str = "loss") -> go.Figure:
    """The paper's Fig 6: loss vs tokens seen, one line per model. curves: label -> metrics.jsonl rows."""
    fig = go.Figure()
    for i, (label, rows) in enumerate(curves.items()):
        pts = [(r["tokens"], r[key]) for r in rows if r.get("kind") == kind and key in r]
        if not pts:
            continue
        x, y = zip(*pts)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines+markers" if len(x) < 30 else "lines",
                name=label,
                line=dict(color=PALETTE[i % len(PALETTE)]),
            )
        )
    title = {"loss": "Training loss", "val_loss": "Validation loss"}.get(key, key)
    fig.update_layout(
        title=f"{title} vs tokens seen",
        xaxis_title="tokens",
        yaxis_title=key,
        template="plotly_white",
        legend_title="model",
        width=760,
        height=460,
    )
    return fig


# -- cluster explorer ----------------------------------------------------------------------------------------------
def _group_color(label: int) -> str:
    return "#bbbbbb" if label < 0 else PALETTE[label % len(PALETTE)]


def similarity_heatmap(view, title: str | None = None) -> go.Figure:
    """S [Z, Z] with experts ordered by group (then frequency); group boundaries drawn."""
    order = view.order
    S = view.S[np.ix_(order, order)]
    names = [f"e{z} (g{view.labels[z]})" if view.labels[z] >= 0 else f"e{z} (pruned)" for z in order]
    fig = go.Figure(
        go.Heatmap(z=S, x=names, y=names, colorscale="Viridis", zmin=float(S.min()), zmax=1.0, colorbar=dict(title="S"))
    )
    labels = view.labels[order]
    for b in np.flatnonzero(np.diff(labels)) + 0.5:
        fig.add_shape(type="line", x0=b, x1=b, y0=-0.5, y1=len(order) - 0.5, line=dict(color="white", width=1))
        fig.add_shape(type="line", y0=b, y1=b, x0=-0.5, x1=len(order) - 0.5, line=dict(color="white", width=1))
    fig.update_layout(
        title=title or f"Layer {view.layer}: router-logit similarity S (ordered by {view.method} group)",
        width=620,
        height=560,
        template="plotly_white",
        yaxis=dict(autorange="reversed"),
    )
    return fig


def eigen_spectrum(view, title: str | None = None) -> go.Figure:
    """Normalised-Laplacian eigenvalues with the gap after the D-th marked."""
    ev = view.eigenvalues
    k = np.arange(1, len(ev) + 1)
    fig = go.Figure(go.Scatter(x=k, y=ev, mode="lines+markers", name="eigenvalue"))
    fig.add_vline(
        x=view.D + 0.5, line=dict(dash="dash", color="#d62728"), annotation_text=f"D={view.D} (gap {view.eigengap:.3f})"
    )
    if view.suggested_D != view.D:
        fig.add_vline(
            x=view.suggested_D + 0.5,
            line=dict(dash="dot", color="#2ca02c"),
            annotation_text=f"largest gap: D={view.suggested_D}",
            annotation_position="bottom right",
        )
    fig.update_layout(
        title=title or f"Layer {view.layer}: Laplacian spectrum",
        xaxis_title="k",
        yaxis_title="lambda_k",
        template="plotly_white",
        width=620,
        height=400,
    )
    return fig


def tsne_scatter(view, title: str | None = None) -> go.Figure:
    """t-SNE of the spectral embedding F, coloured by group, sized by activation frequency; centres outlined."""
    fig = go.Figure()
    _add_tsne_traces(fig, view)
    fig.update_layout(
        title=title or f"Layer {view.layer}: t-SNE of the spectral embedding ({view.method}, D={view.D})",
        template="plotly_white",
        width=620,
        height=520,
        xaxis_title="t-SNE 1",
        yaxis_title="t-SNE 2",
    )
    return fig


def _marker_sizes(freq: np.ndarray) -> np.ndarray:
    return 8 + 40 * np.sqrt(freq / max(freq.max(), 1e-12))


def _add_tsne_traces(fig: go.Figure, view, row: int | None = None, col: int | None = None, legend: bool = True):
    sizes = _marker_sizes(view.frequencies)
    for g in sorted(set(view.labels.tolist())):
        idx = np.flatnonzero(view.labels == g)
        line = [2 if z in view.centres else 0 for z in idx]
        tr = go.Scatter(
            x=view.tsne[idx, 0],
            y=view.tsne[idx, 1],
            mode="markers",
            name="pruned" if g < 0 else f"group {g}",
            legendgroup=str(g),
            showlegend=legend,
            marker=dict(size=sizes[idx], color=_group_color(g), line=dict(width=line, color="black"), opacity=0.85),
            text=[
                f"expert {z}<br>freq {view.frequencies[z]:.3f}" + ("<br>centre" if z in view.centres else "")
                for z in idx
            ],
            hoverinfo="text",
        )
        if row is None:
            fig.add_trace(tr)
        else:
            fig.add_trace(tr, row=row, col=col)


def tsne_grid(views: list, title: str = "t-SNE of the spectral embedding per MoE layer") -> go.Figure:
    """All MoE layers side by side (the paper's Sec 6.3 figure)."""
    from plotly.subplots import make_subplots

    n = len(views)
    cols = min(4, n)
    rows = -(-n // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"MoE layer {v.layer} (D={v.D})" for v in views])
    for i, v in enumerate(views):
        _add_tsne_traces(fig, v, row=i // cols + 1, col=i % cols + 1, legend=False)
    fig.update_layout(
        title=title, template="plotly_white", width=300 * cols + 80, height=300 * rows + 80, showlegend=False
    )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def stability_bars(stabilities: list[float], D: int) -> go.Figure:
    fig = go.Figure(
        go.Bar(
            x=[f"layer {i}" for i in range(len(stabilities))],
            y=stabilities,
            text=[f"{s:.2f}" for s in stabilities],
            textposition="outside",
        )
    )
    fig.update_layout(
        title=f"Cluster stability across k-means seeds (mean pairwise ARI, D={D})",
        yaxis=dict(range=[0, 1.1], title="ARI"),
        template="plotly_white",
        width=620,
        height=380,
    )
    return fig


# -- pruning comparison --------------------------------------------------------------------------------------------
def accuracy_vs_experts(
    rows, task: str, metric: str = "accuracy", chance: float | None = None, title: str | None = None
) -> go.Figure:
    """Accuracy after finetuning vs experts kept per layer: one line per reduction method; models trained from
    scratch (method 'none') as stars; the unreduced base as a dashed line. Also any other metric column of `rows`
    (e.g. the zero-shot readouts' lm_loss, with a title saying so)."""
    df = rows[rows["task"] == task]
    fig = go.Figure()
    reduced = df[df["method"] != "none"]
    for i, (method, g) in enumerate(reduced.groupby("method")):
        g = g.groupby("d", as_index=False)[metric].mean().sort_values("d")
        fig.add_trace(
            go.Scatter(
                x=g["d"], y=g[metric], mode="lines+markers", name=method, line=dict(color=PALETTE[i % len(PALETTE)])
            )
        )
    scratch = df[(df["method"] == "none")]
    z_max = int(df["z"].max()) if len(df) else 0
    base = scratch[scratch["d"] == z_max]
    others = scratch[scratch["d"] != z_max]
    if len(others):
        fig.add_trace(
            go.Scatter(
                x=others["d"],
                y=others[metric],
                mode="markers",
                name="trained from scratch",
                marker=dict(symbol="star", size=14, color="black"),
            )
        )
    if len(base):
        fig.add_hline(
            y=float(base[metric].mean()), line=dict(dash="dash", color="#7f7f7f"), annotation_text=f"unreduced {z_max}e"
        )
    if chance is not None:
        fig.add_hline(y=chance, line=dict(dash="dot", color="#bbbbbb"), annotation_text="chance")
    ticks = sorted(set(df["d"].tolist()) | ({z_max} if z_max else set()))
    fig.update_layout(
        title=title or f"{task}: {metric} after finetuning vs experts per layer",
        xaxis=dict(title="experts per layer (D)", type="log", tickvals=ticks, ticktext=[str(t) for t in ticks]),
        yaxis_title=metric,
        template="plotly_white",
        width=760,
        height=460,
    )
    return fig


# -- inference cost ------------------------------------------------------------------------------------------------
def loss_vs_latency(profile, title: str = "Validation loss vs inference latency per expert count (Fig 2a)"):
    """The paper's Fig 2a: validation loss vs forward latency, one point per expert count."""
    fig = go.Figure(
        go.Scatter(
            x=profile["latency_ms"],
            y=profile["val_loss"],
            mode="markers+text+lines",
            text=profile["model"],
            textposition="top center",
            marker=dict(size=12, color=PALETTE[0]),
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="forward latency (ms)",
        yaxis_title="validation loss",
        template="plotly_white",
        width=760,
        height=460,
    )
    return fig


def moe_breakdown_bars(profile) -> go.Figure:
    """Time split of one MoE layer per expert count (cf. the paper's Figs 4-5)."""
    parts = [c for c in profile.columns if c.startswith("moe_") and c.endswith("_ms")]
    df = profile.dropna(subset=parts) if parts else profile.iloc[0:0]
    fig = go.Figure()
    for i, c in enumerate(parts):
        fig.add_trace(go.Bar(x=df["model"], y=df[c], name=c[4:-3], marker_color=PALETTE[i % len(PALETTE)]))
    fig.update_layout(
        barmode="stack",
        title="Where the time of one MoE layer goes (forward, eval mode)",
        yaxis_title="ms",
        template="plotly_white",
        width=760,
        height=460,
    )
    return fig


# -- router health (smoe_lab.router_health) -------------------------------------------------------------------------
def router_health_curves(
    curves: dict[str, list[dict[str, Any]]], key: str = "entropy_ratio", kind: str = "train"
) -> go.Figure:
    """Router health vs tokens seen: one line per (model, MoE layer), from metrics.jsonl rows. key: entropy_ratio
    (with the 0.8 warning line and 1 = uniform), top1_gate, max_share, min_share or drop_frac."""
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
        title=f"{titles.get(key, key)} vs tokens seen",
        xaxis_title="tokens",
        yaxis_title=key,
        template="plotly_white",
        legend_title="model · layer",
        width=760,
        height=460,
    )
    return fig
