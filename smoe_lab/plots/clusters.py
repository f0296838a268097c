"""The cluster explorer's figures (notebook 02): similarity heatmap, eigen-spectrum, t-SNE scatter and grid with
frequency-sized markers and centre rings, stability bars; group colours that never repeat within Z."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .core import DROPPED, PALETTE


def group_colors(n: int) -> list[str]:
    """n distinct colours for groups 0..n-1: the house palette up to its 9, plotly's 24-colour Dark24 up to 24,
    else n samples of the Turbo colormap (so no two groups of a 128-expert layer share a colour)."""
    import plotly.colors as pc

    if n <= len(PALETTE):
        return PALETTE[: max(n, 0)]
    if n <= len(pc.qualitative.Dark24):
        return list(pc.qualitative.Dark24[:n])
    return pc.sample_colorscale("Turbo", [0.03 + 0.94 * i / (n - 1) for i in range(n)])


def _is_pruning(view) -> bool:
    return not getattr(view, "merge", True)


def _group_name(view, z: int) -> str:
    g = int(view.labels[z])
    if _is_pruning(view):
        return "kept" if g >= 0 else "dropped"
    return f"g{g}" if g >= 0 else "dropped"


def _coloured_by(view) -> str:
    """Whose groups colour the t-SNE (its embedding is always UNCURL's)."""
    if view.method == "uncurl":
        return f"coloured by UNCURL's clusters (D={view.D})"
    what = "kept / dropped experts" if _is_pruning(view) else "groups"
    lm = getattr(view, "layer_method", "")
    here = f" ({lm} on this layer)" if lm and lm != view.method else ""
    return f"coloured by {view.method}'s {what}{here} (D={view.D})"


def _data_note(view) -> str:
    data = getattr(view, "data", "")
    return f"calibration: {data}" if data else ""


def _budget_note(view) -> str:
    budget = getattr(view, "budget", None)
    return f", mcsmoe budget {budget} over all layers" if budget else ""


def similarity_heatmap(view, title: str | None = None, width: int = 620, height: int = 560) -> go.Figure:
    """S [Z, Z] with experts ordered by group (then frequency); group boundaries drawn."""
    order = view.order
    S = view.S[np.ix_(order, order)]
    names = [f"e{z} ({_group_name(view, z)})" for z in order]
    fig = go.Figure(
        go.Heatmap(z=S, x=names, y=names, colorscale="Viridis", zmin=float(S.min()), zmax=1.0, colorbar=dict(title="S"))
    )
    labels = view.labels[order]
    for b in np.flatnonzero(np.diff(labels)) + 0.5:
        fig.add_shape(type="line", x0=b, x1=b, y0=-0.5, y1=len(order) - 0.5, line=dict(color="white", width=1))
        fig.add_shape(type="line", y0=b, y1=b, x0=-0.5, x1=len(order) - 0.5, line=dict(color="white", width=1))
    what = "kept first" if _is_pruning(view) else "grouped"
    fig.update_layout(
        title=title
        or f"Layer {view.layer}: router-logit similarity S = (1+cos)/2<br><sup>{what} by {view.method} (D={view.D})"
        + (f"; {_data_note(view)}" if _data_note(view) else "")
        + "</sup>",
        width=width,
        height=height,
        template="plotly_white",
        yaxis=dict(autorange="reversed"),
        margin=dict(l=60, r=20, t=60, b=60),
    )
    return fig


def eigen_spectrum(view, title: str | None = None, width: int = 620, height: int = 400) -> go.Figure:
    """Normalised-Laplacian eigenvalues λ_k with the gap after the D-th marked (labels above the plot area)."""
    ev = view.eigenvalues
    k = np.arange(1, len(ev) + 1)
    fig = go.Figure(go.Scatter(x=k, y=ev, mode="lines+markers", name="λ<sub>k</sub>", showlegend=False))
    gap = ""
    if np.isfinite(view.eigengap):
        gap = f", gap λ<sub>{view.D + 1}</sub> − λ<sub>{view.D}</sub> = {view.eigengap:.3f}"
    fig.add_vline(x=view.D + 0.5, line=dict(dash="dash", color="#d62728"))
    fig.add_annotation(
        x=view.D + 0.5, y=1.0, yref="paper", yanchor="bottom", showarrow=False, text=f"D={view.D}{gap}",
        font=dict(color="#d62728"), xanchor="left",
    )  # fmt: skip
    if view.suggested_D != view.D:  # above the plot area too, one line higher: never on the curve
        fig.add_vline(x=view.suggested_D + 0.5, line=dict(dash="dot", color="#2ca02c"))
        fig.add_annotation(
            x=view.suggested_D + 0.5, y=1.08, yref="paper", yanchor="bottom", showarrow=False, xanchor="left",
            text=f"largest gap: D={view.suggested_D}", font=dict(color="#2ca02c"),
        )  # fmt: skip
    fig.update_layout(
        title=title
        or f"Layer {view.layer}: normalised-Laplacian spectrum of S (Z={len(ev)})"
        + (f"<br><sup>{_data_note(view)}</sup>" if _data_note(view) else ""),
        xaxis=dict(title="k", dtick=1 if len(ev) <= 32 else None),
        yaxis_title="λ<sub>k</sub>",
        template="plotly_white",
        width=width,
        height=height,
        margin=dict(l=60, r=20, t=110, b=50),
    )
    return fig


def tsne_title(view) -> str:
    """What a t-SNE panel shows: UNCURL's spectral embedding (at which D, whether the layout is fixed per layer),
    coloured by whose groups."""
    t_d = getattr(view, "tsne_D", 0) or view.D
    fixed = ", layout fixed per layer" if getattr(view, "layout", "per_d") == "stable" else ""
    return (
        f"Layer {view.layer}: t-SNE of UNCURL's spectral embedding (D={t_d}{fixed})"
        f"<br><sup>{_coloured_by(view)}{_budget_note(view)}"
        + (f"; {_data_note(view)}" if _data_note(view) else "")
        + "</sup>"
    )


def tsne_scatter(view, title: str | None = None, width: int = 620, height: int = 520) -> go.Figure:
    """t-SNE of the spectral embedding F, coloured by group, sized by activation frequency; centres outlined."""
    fig = go.Figure()
    _add_tsne_traces(fig, view)
    _add_tsne_key(fig, view)
    fig.update_layout(
        title=dict(text=title or tsne_title(view), font=dict(size=13)),
        template="plotly_white",
        width=width,
        height=height,
        xaxis=dict(title="t-SNE 1", showticklabels=False),
        yaxis=dict(title="t-SNE 2", showticklabels=False),
        margin=dict(l=40, r=20, t=60, b=40),
        # narrow (the explorer's grid): the legend under the plot, so the points keep the width
        legend=dict(itemsizing="constant", **(dict(orientation="h", y=-0.12) if width < 600 else {})),
    )
    return fig


def _marker_sizes(freq: np.ndarray) -> np.ndarray:
    return 8 + 40 * np.sqrt(freq / max(freq.max(), 1e-12))


def _add_tsne_key(fig: go.Figure, view) -> None:
    """Legend entries for what the markers mean: size = activation frequency, black ring = the group's centre."""
    f_max = float(view.frequencies.max())
    fig.add_trace(
        go.Scatter(
            x=[None], y=[None], mode="markers", legendgroup="key",
            name=f"size ~ sqrt(activation freq); largest = {f_max:.3f}",
            marker=dict(size=14, color="white", line=dict(color="#888", width=1)),
        )
    )  # fmt: skip
    ring = "kept expert" if _is_pruning(view) else "centre (reference expert)"
    fig.add_trace(
        go.Scatter(
            x=[None], y=[None], mode="markers", name=f"black ring: {ring}", legendgroup="key",
            marker=dict(size=14, color="white", line=dict(color="black", width=2)),
        )
    )  # fmt: skip


def _add_tsne_traces(fig: go.Figure, view, row: int | None = None, col: int | None = None, legend: bool = True):
    sizes = _marker_sizes(view.frequencies)
    groups = sorted(set(view.labels.tolist()))
    colors = group_colors(int(view.labels.max()) + 1)
    pruning = _is_pruning(view)
    keys = ["dropped", "kept"] if pruning else groups
    for key in keys:
        if pruning:
            idx = np.flatnonzero((view.labels >= 0) == (key == "kept"))
            color = PALETTE[0] if key == "kept" else DROPPED
            name = str(key)
        else:
            idx = np.flatnonzero(view.labels == key)
            color = DROPPED if key < 0 else colors[key]
            name = "dropped" if key < 0 else f"group {key}"
        if not len(idx):
            continue
        centre = [z in view.centres for z in idx]
        line = [2 if c else 0 for c in centre]
        tr = go.Scatter(
            x=view.tsne[idx, 0],
            y=view.tsne[idx, 1],
            mode="markers",
            name=name,
            legendgroup=name,
            showlegend=legend,
            marker=dict(size=sizes[idx], color=color, line=dict(width=line, color="black"), opacity=0.85),
            text=[
                f"expert {z}<br>freq {view.frequencies[z]:.3f}<br>{_group_name(view, z)}" + ("<br>centre" if c else "")
                for z, c in zip(idx, centre)
            ],
            hoverinfo="text",
        )
        if row is None:
            fig.add_trace(tr)
        else:
            fig.add_trace(tr, row=row, col=col)


def tsne_grid(views: list, title: str | None = None, data: str = "") -> go.Figure:
    """All MoE layers side by side (the paper's Sec 6.3 figure), with a key for marker size and the centre ring.

    data: what the calibration ran on (e.g. "boolq/train, 62,885 tokens"; default: the views'), for the title."""
    from plotly.subplots import make_subplots

    data = data or (getattr(views[0], "data", "") if views else "")

    n = len(views)
    cols = min(4, n)
    rows = -(-n // cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[f"MoE layer {v.layer} (Z={len(v.labels)}, D={v.D})" for v in views],
        horizontal_spacing=0.03,
        vertical_spacing=0.08,
    )
    for i, v in enumerate(views):
        _add_tsne_traces(fig, v, row=i // cols + 1, col=i % cols + 1, legend=False)
    if views:
        _add_tsne_key(fig, views[0])
    methods = sorted({v.method for v in views})
    sub = f"coloured by {', '.join(methods)} groups" + (f"; calibration: {data}" if data else "")
    title = title or f"t-SNE of UNCURL's spectral embedding per MoE layer<br><sup>{sub}</sup>"
    fig.update_layout(
        title=title,
        template="plotly_white",
        width=280 * cols + 260,
        height=280 * rows + 110,
        margin=dict(l=20, r=20, t=90, b=20),
        legend=dict(itemsizing="constant", x=1.01, y=1),
    )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def stability_bars(stabilities: list[float], D: int, seeds: int | None = None, data: str = "") -> go.Figure:
    """UNCURL's cluster stability per layer: mean pairwise ARI over `seeds` k-means seeds; data for the title."""
    sub = ", ".join(x for x in (f"{seeds} k-means seeds" if seeds else "", f"calibration: {data}" if data else "") if x)
    fig = go.Figure(
        go.Bar(
            x=[f"layer {i}" for i in range(len(stabilities))],
            y=stabilities,
            text=[f"{s:.2f}" for s in stabilities],
            textposition="outside",
        )
    )
    fig.update_layout(
        title=f"Cluster stability across k-means seeds (mean pairwise ARI, D={D})"
        + (f"<br><sup>{sub}</sup>" if sub else ""),
        yaxis=dict(range=[0, 1.1], title="ARI"),
        template="plotly_white",
        width=620,
        height=380,
    )
    return fig


# -- pruning comparison --------------------------------------------------------------------------------------------
