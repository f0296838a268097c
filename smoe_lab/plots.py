"""Plotly figures used by the notebooks. Every figure can be saved as HTML + PNG with `save_figure`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def save_figure(fig: go.Figure, out_dir: str | Path, name: str, png: bool = True, scale: float = 2.0) -> dict[str, str]:
    """Write `name`.html (self-contained, interactive) and `name`.png (static, via kaleido) under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": str(out / f"{name}.html")}
    # plotly.js is embedded (~3.5 MB) so the HTML opens offline, e.g. on a GPU node without internet.
    fig.write_html(paths["html"], include_plotlyjs=True, full_html=True)
    if png:
        paths["png"] = str(out / f"{name}.png")
        fig.write_image(paths["png"], scale=scale)
    return paths


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
