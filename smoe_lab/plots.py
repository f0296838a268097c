"""Plotly figures used by the notebooks and the replication report, and the building blocks they share (house
layout, mean ± sd traces, reference lines, forest plot). Every figure can be saved as HTML + PNG with `save_figure`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from .router_health import WARN_ENTROPY_RATIO


def use_mimetype_renderer() -> bool:
    """In a Jupyter kernel, show figures as their JSON only (`plotly_mimetype`), not also as HTML with plotly.js
    embedded (plotly's default there, `plotly_mimetype+notebook`, puts the 3.5 MB plotly.js into every executed
    notebook). JupyterLab draws the JSON with the jupyterlab-plotly extension that ships with plotly, offline; the
    self-contained copy of every figure is its HTML file (`save_figure`). Returns whether it changed the default;
    another renderer the user chose is kept."""
    if pio.renderers.default == "plotly_mimetype+notebook":
        pio.renderers.default = "plotly_mimetype"
        return True
    return False


use_mimetype_renderer()

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


def loss_curves(
    curves: dict[str, list[dict[str, Any]]], kind: str = "train", key: str = "loss", data: str = ""
) -> go.Figure:
    """The paper's Fig 6: LM loss vs tokens seen, one line per model. curves: label -> metrics.jsonl rows. The
    logged "loss" / "val_loss" are the LM cross-entropy alone (the load-balancing aux loss is logged apart).
    data: what the curves were measured on, for the subtitle (e.g. "tiny corpus, 600,000 tokens per model")."""
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
    title = {"loss": "Training LM loss", "val_loss": "Validation LM loss"}.get(key, key)
    sub = ", ".join(x for x in (data, "aux loss excluded") if x)
    fig.update_layout(
        title=f"{title} vs tokens seen (Fig 6)<br><sup>{sub}</sup>",
        xaxis_title="tokens seen",
        yaxis_title="LM loss (nats)" if key in ("loss", "val_loss") else key,
        template="plotly_white",
        legend_title="model",
        width=760,
        height=460,
    )
    return fig


# -- cluster explorer ----------------------------------------------------------------------------------------------
DROPPED = "#bbbbbb"


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
        title=title or f"Layer {view.layer}: router-logit similarity S (1+cos)/2, {what} by {view.method} (D={view.D})",
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
        legend=dict(itemsizing="constant"),
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
ONE_CLASS_SHARE = 0.98  # a model giving the same answer to at least this share of examples is flagged
ACCURACY_METRICS = ("accuracy", "acc_norm", "dev_accuracy", "dev_acc_norm")


def interval(values, n: int | None, proportion: bool) -> tuple[float, float, float]:
    """(centre, minus, plus) of one point: several values (seeds) -> mean with its 95% t interval; one proportion
    measured on n examples -> the value with its 95% Wilson interval; else the value without an interval."""
    from scipy import stats

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), 0.0, 0.0
    if len(v) > 1:
        half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
        return float(v.mean()), half, half
    if proportion and n:
        from .evaluate import wilson_interval

        lo, hi = wilson_interval(float(v[0]), int(n))
        return float(v[0]), float(v[0]) - lo, hi - float(v[0])
    return float(v[0]), 0.0, 0.0


def stagger(d: float, i: int, k: int, step: float = 0.035) -> float:
    """x of series i of k at expert count d on a log axis: side by side around d, never on top of each other."""
    return float(d * (1 + step) ** (i - (k - 1) / 2))


def _n_of(g, n: int | None) -> int | None:
    if "n_eval" in g and g["n_eval"].notna().any():
        return int(g["n_eval"].dropna().iloc[0])
    return n


def _one_class(g) -> bool:
    return "top_pred_share" in g and bool((g["top_pred_share"].fillna(0) >= ONE_CLASS_SHARE).any())


def accuracy_vs_experts(
    rows,
    task: str,
    metric: str = "accuracy",
    chance: float | None = None,
    title: str | None = None,
    majority: float | None = None,
    n: int | None = None,
    data: str = "validation",
) -> go.Figure:
    """Accuracy after finetuning vs experts kept per layer: one series per reduction method, models trained from
    scratch (method 'none') as stars, the unreduced base as a dashed line and a diamond, chance and the majority
    class as dotted lines. Every point has a 95% interval: Wilson on its n examples for one accuracy, t over seeds
    where there are several; points sharing a D stand side by side; a model that gives one answer to (nearly)
    every example (top_pred_share >= ONE_CLASS_SHARE) is crossed out. Also any other metric column of `rows`
    (e.g. the zero-shot readouts' lm_loss, with a
    title saying so; no Wilson interval there). n: examples per accuracy when the rows carry no n_eval column."""
    df = rows[rows["task"] == task]
    proportion = metric in ACCURACY_METRICS
    fig = go.Figure()
    z_max = int(df["z"].max()) if len(df) else 0
    scratch = df[df["method"] == "none"]
    base = scratch[scratch["d"] == z_max]
    others = scratch[scratch["d"] != z_max]
    series = [
        (m, g, PALETTE[i % len(PALETTE)]) for i, (m, g) in enumerate(df[df["method"] != "none"].groupby("method"))
    ]
    if len(others):
        series.append(("trained from scratch", others, "black"))
    n_seen, one_class = set(), []
    for i, (name, g, color) in enumerate(series):
        pts = []
        for d, gd in g.groupby("d"):
            nd = _n_of(gd, n)
            n_seen.add(nd)
            y, lo, hi = interval(gd[metric], nd, proportion)
            pts.append((stagger(d, i, len(series)), y, lo, hi, int(d), len(gd)))
            if _one_class(gd):
                one_class.append((pts[-1][0], y, f"{name}, D={int(d)}"))
        if not pts:
            continue
        x, y, lo, hi, ds, k = zip(*pts)
        star = name == "trained from scratch"
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, thickness=1.2),
                mode="markers" if star else "lines+markers",
                name=name,
                marker=dict(symbol="star", size=13, color=color) if star else dict(size=8, color=color),
                line=dict(color=color),
                customdata=list(zip(ds, k)),
                hovertemplate=f"{name}<br>D=%{{customdata[0]}}<br>{metric} %{{y:.4f}}<br>seeds %{{customdata[1]}}"
                "<extra></extra>",
            )
        )
    if len(base):
        nb = _n_of(base, n)
        n_seen.add(nb)
        y, lo, hi = interval(base[metric], nb, proportion)
        fig.add_hline(y=y, line=dict(dash="dash", color="#7f7f7f"), annotation_text=f"unreduced {z_max}e")
        fig.add_trace(
            go.Scatter(
                x=[z_max], y=[y], error_y=dict(type="data", symmetric=False, array=[hi], arrayminus=[lo]),
                mode="markers", name=f"unreduced {z_max}e", marker=dict(symbol="diamond", size=10, color="#7f7f7f"),
            )
        )  # fmt: skip
        if _one_class(base):
            one_class.append((z_max, y, f"unreduced {z_max}e"))
    if one_class:
        x, y, who = zip(*one_class)
        fig.add_trace(
            go.Scatter(
                x=x, y=y, mode="markers", name=f"same answer for >= {ONE_CLASS_SHARE:.0%} of examples", text=who,
                hoverinfo="text",
                marker=dict(symbol="x-thin-open", size=18, color="#d62728", line=dict(width=2, color="#d62728")),
            )
        )  # fmt: skip
    if chance is not None:
        fig.add_hline(
            y=chance, line=dict(dash="dot", color="#bbbbbb"), annotation_text=f"chance {chance:.3f}",
            annotation_position="bottom left",
        )  # fmt: skip
    if majority is not None and np.isfinite(majority):
        fig.add_hline(y=majority, line=dict(dash="dot", color="#ff7f0e"))
        fig.add_annotation(  # between the first two D ticks of the log axis: clear of the points
            x=0.3, xref="paper", y=majority, yanchor="bottom", showarrow=False, font=dict(color="#ff7f0e"),
            text=f"majority class {majority:.3f}",
        )  # fmt: skip
    ticks = sorted(set(df["d"].tolist()) | ({z_max} if z_max else set()))
    ns = sorted(x for x in n_seen if x)
    n_text = f"n={ns[0]}" if len(ns) == 1 else (f"n={ns[0]}-{ns[-1]}" if ns else "n unknown")
    bars = "95% Wilson (one run) / t over seeds" if proportion else "95% t over seeds"
    fig.update_layout(
        title=dict(
            text=title
            or f"{task}: {metric} after finetuning vs experts per layer<br><sup>{data}, {n_text} examples per "
            f"point; bars: {bars}</sup>",
        ),
        xaxis=dict(
            title="experts per layer (D)",
            type="log",
            tickvals=ticks,
            ticktext=["dense" if t == 1 else str(t) for t in ticks],
        ),  # fmt: skip
        yaxis_title=metric,
        template="plotly_white",
        width=820,
        height=500,
    )
    return fig


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


def _iqr(df, col: str, axis: str = "y") -> dict[str, Any] | None:
    if f"{col}_q25" not in df or f"{col}_q75" not in df:
        return None
    return dict(
        type="data", symmetric=False, array=(df[f"{col}_q75"] - df[col]).to_numpy(),
        arrayminus=(df[col] - df[f"{col}_q25"]).to_numpy(),
    )  # fmt: skip


def loss_vs_latency(profile, title: str = "Validation loss vs inference latency per expert count (Fig 2a)"):
    """The paper's Fig 2a: validation loss vs forward latency, one point per expert count (bars: IQR of timings)."""
    fig = go.Figure(
        go.Scatter(
            x=profile["latency_ms"],
            y=profile["val_loss"],
            error_x=_iqr(profile, "latency_ms"),
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
            go.Bar(x=df["model"], y=df[c], name=c[4:-3], marker_color=PALETTE[i % len(PALETTE)], error_y=_iqr(df, c))
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
