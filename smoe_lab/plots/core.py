"""The house style and the building blocks every figure shares: the notebook renderer, save_figure (HTML + PNG),
white_layout, mean ± sd traces and bars, reference lines, the experts axis, the forest plot, loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio


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


def iqr_error(df, col: str) -> dict[str, Any] | None:
    """Asymmetric error bars from the median column `col` to its quartile columns `col`_q25 / `col`_q75 (None when
    the frame has no quartiles)."""
    if f"{col}_q25" not in df or f"{col}_q75" not in df:
        return None
    lo, hi = df[f"{col}_q25"], df[f"{col}_q75"]
    return dict(type="data", symmetric=False, array=(hi - df[col]).to_numpy(), arrayminus=(df[col] - lo).to_numpy())
