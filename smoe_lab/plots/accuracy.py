"""Accuracy against expert count (notebook 03, the replication report): chance and majority lines, n, a 95%
interval on every point (Wilson for one accuracy, t over seeds), staggered points, the one-class flag."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ..evaluate import wilson_interval
from .core import PALETTE

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
    (e.g. the zero-shot readouts' lm_loss, with a title saying so; no Wilson interval there). n: examples per
    accuracy when the rows carry no n_eval column."""
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
