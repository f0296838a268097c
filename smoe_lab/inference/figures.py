"""Figures of the inference-cost picture (plotly; save with `smoe_lab.plots.save_figure`).

    fig2a_loss_vs_latency(profile)      validation loss vs latency per expert count, 1 rank and under EP (Fig 2a)
    fig2b_dense_equivalent(table)       Clark et al. 2022's dense-equivalent size per expert count + measured loss
    fig4_all2all_vs_experts(layers)     all-to-all vs expert compute in one MoE layer as E grows (Fig 4)
    fig5_latency_vs_ranks(scaling)      latency vs number of ranks for one model (Fig 5)
    payoff_bars(payoff)                 latency and peak memory: unreduced vs reduced vs scratch

Every title states batch, sequence length, device and backend, and on a CPU that CPU numbers are not GPU numbers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..plots import PALETTE, iqr_error


def protocol_note(df: pd.DataFrame) -> str:
    """'batch 2/rank x 256 tokens, cpu (gloo, float32): CPU numbers are not GPU numbers' from a profile table."""
    r = df.iloc[0]
    text = f"batch {int(r['batch_size'])}/rank x {int(r['seq_len'])} tokens, "
    text += f"{r['device']} ({r['backend']}, {r['dtype']})"
    if r["device"] == "cpu":
        text += ": CPU numbers are not GPU numbers"
    if "oversubscribed" in df and df["oversubscribed"].astype(bool).any():
        text += "; open markers: more ranks than cores"
    return text


def _si(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _title(main: str, df: pd.DataFrame) -> dict:
    return dict(text=f"{main}<br><sup>{protocol_note(df)}</sup>")


def fig2a_loss_vs_latency(profile: pd.DataFrame) -> go.Figure:
    """Validation loss (notebook 01) vs forward latency, one point per expert count; one line per rank count."""
    df = profile.dropna(subset=["val_loss"]).sort_values(["ranks", "experts"])
    fig = go.Figure()
    for i, (ranks, g) in enumerate(df.groupby("ranks")):
        ep = int(g["ep_size"].max())
        name = f"{ranks} rank, no EP" if ranks == 1 else f"{ranks} ranks, EP {ep}"
        fig.add_trace(
            go.Scatter(
                x=g["latency_ms"],
                y=g["val_loss"],
                error_x=iqr_error(g, "latency_ms"),
                mode="markers+lines+text",
                text=g["model"],
                textposition="top center",
                name=name,
                marker=dict(size=11, color=PALETTE[i % len(PALETTE)]),
            )
        )
    fig.update_layout(
        title=_title("Validation loss vs inference latency per expert count (Fig 2a)", df if len(df) else profile),
        xaxis_title="forward latency, whole model (ms; median, bars: IQR)",
        yaxis_title="validation loss",
        template="plotly_white",
        width=820,
        height=480,
        legend_title="ranks",
    )
    return fig


def fig2b_dense_equivalent(table: pd.DataFrame) -> go.Figure:
    """Left: Clark et al. 2022's performance-equivalent dense size N̄ per expert count; right: measured losses."""
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("dense-equivalent size (Clark et al. 2022, Eq. 1, Table 3)", "measured validation loss"),
    )
    for i, (backbone, g) in enumerate(table.groupby("backbone", sort=False)):
        g = g.sort_values("experts")
        extra = " (extrapolated: fits start at ~15M)" if g["extrapolated"].any() else ""
        fig.add_trace(
            go.Scatter(
                x=g["experts"],
                y=g["dense_equivalent_params"] / 1e6,
                mode="lines+markers+text",
                text=[_si(v) for v in g["dense_equivalent_params"]],
                textposition="top left",
                name=f"{backbone}{extra}",
                marker=dict(color=PALETTE[i % len(PALETTE)]),
            ),
            row=1,
            col=1,
        )
        if "measured_val_loss" in g and g["measured_val_loss"].notna().any():
            m = g.dropna(subset=["measured_val_loss"])
            fig.add_trace(
                go.Scatter(
                    x=m["experts"],
                    y=m["measured_val_loss"],
                    mode="lines+markers",
                    name=f"{backbone}: measured",
                    marker=dict(color=PALETTE[i % len(PALETTE)], symbol="diamond"),
                ),
                row=1,
                col=2,
            )
    fit = table["fit"].iloc[0] if len(table) else ""
    fig.update_xaxes(type="log", title_text="experts per MoE layer (1 = dense)")
    fig.update_yaxes(type="log", title_text="dense-equivalent parameters (M)", row=1, col=1)
    fig.update_yaxes(title_text="validation loss", row=1, col=2)
    fig.update_layout(
        title=f"Performance-equivalent dense size per expert count (Fig 2b; {fit} fit)",
        template="plotly_white",
        width=1000,
        height=460,
    )
    return fig


def fig4_all2all_vs_experts(profile: pd.DataFrame, ranks: int | None = None) -> go.Figure:
    """Per MoE layer, at one rank count with expert parallelism: all-to-all (waiting / exchange where measured)
    vs expert compute vs the rest of the layer, one group of bars per expert count."""
    df = profile[profile["moe_layers"] > 0]
    ep_ranks = sorted(df.loc[df["ep_size"] > 1, "ranks"].unique())
    ranks = ranks or (ep_ranks[-1] if ep_ranks else int(df["ranks"].max()))
    df = df[(df["ranks"] == ranks) & df["model"].str.fullmatch(r"\d+e")].sort_values("experts")
    x = df["model"]
    fig = go.Figure()
    split = "all2all_wait_ms" in df and df["all2all_wait_ms"].notna().any()
    if split:
        wait = df["all2all_wait_ms"]
        fig.add_trace(
            go.Bar(x=x, y=wait, name="all-to-all: waiting for the group", offsetgroup=0, marker_color="#ff9896")
        )
        fig.add_trace(
            go.Bar(
                x=x,
                y=df["all2all_transfer_ms"],
                name="all-to-all: exchange",
                offsetgroup=0,
                base=wait,
                marker_color=PALETTE[1],
            )
        )
    else:
        fig.add_trace(
            go.Bar(
                x=x,
                y=df["all2all_ms"],
                error_y=iqr_error(df, "all2all_ms"),
                name="all-to-all",
                offsetgroup=0,
                marker_color=PALETTE[1],
            )
        )
    fig.add_trace(
        go.Bar(
            x=x,
            y=df["expert_ms"],
            error_y=iqr_error(df, "expert_ms"),
            name="expert compute",
            offsetgroup=1,
            marker_color=PALETTE[0],
        )
    )
    rest = df["gate_ms"] + df["moe_other_ms"]
    fig.add_trace(go.Bar(x=x, y=rest, name="gate + dispatch/combine", offsetgroup=2, marker_color=PALETTE[8]))
    ep = int(df["ep_size"].max()) if len(df) else 1
    fig.update_layout(
        title=_title(f"All-to-all vs expert compute in one MoE layer (Fig 4), {ranks} ranks, EP {ep}", df),
        xaxis_title="experts per MoE layer",
        yaxis_title="ms per MoE layer (median; bars: IQR)",
        barmode="group",
        template="plotly_white",
        width=820,
        height=480,
    )
    return fig


def fig5_latency_vs_ranks(scaling: pd.DataFrame) -> go.Figure:
    """Whole-model latency (and the all-to-all of all MoE layers) vs number of ranks for one model."""
    df = scaling.sort_values("ranks")
    model = df["model"].iloc[0] if len(df) else ""
    over = df["oversubscribed"].astype(bool).to_numpy() if "oversubscribed" in df else np.zeros(len(df), bool)
    symbols = ["circle-open" if o else "circle" for o in over]
    fig = go.Figure(
        go.Scatter(
            x=df["ranks"],
            y=df["latency_ms"],
            error_y=iqr_error(df, "latency_ms"),
            mode="lines+markers",
            name="forward latency",
            marker=dict(size=11, symbol=symbols, color=PALETTE[0]),
        )
    )
    a2a = df["all2all_ms"] * df["moe_layers"]
    fig.add_trace(
        go.Scatter(
            x=df["ranks"],
            y=a2a,
            mode="lines+markers",
            name="all-to-all, all MoE layers",
            marker=dict(size=9, symbol=symbols, color=PALETTE[1]),
        )
    )
    ep = int(df["ep_size"].max()) if len(df) else 1
    fig.update_layout(
        title=_title(f"Latency vs number of ranks, {model} (Fig 5; EP {ep}, data parallel across groups)", df),
        xaxis=dict(title="ranks", tickvals=df["ranks"].tolist()),
        yaxis_title="ms (median, bars: IQR)",
        template="plotly_white",
        width=820,
        height=460,
    )
    return fig


def payoff_bars(payoff: pd.DataFrame, profile: pd.DataFrame, ranks: int | None = None) -> go.Figure:
    """Latency and peak memory of the unreduced base, the reduced models and the scratch models of their size."""
    ranks = ranks or int(payoff["ranks"].max())
    df = payoff[payoff["ranks"] == ranks]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("forward latency (ms)", "peak memory per rank (MiB)"))
    colors = [PALETTE[0] if "base" in k else PALETTE[1] if "reduced" in k else PALETTE[2] for k in df["kind"]]
    fig.add_trace(
        go.Bar(
            x=df["model"], y=df["latency_ms"], error_y=iqr_error(df, "latency_ms"), marker_color=colors, name="latency"
        ),
        row=1,
        col=1,
    )
    fig.add_trace(go.Bar(x=df["model"], y=df["peak_mem_mb"], marker_color=colors, name="peak memory"), row=1, col=2)
    fig.update_layout(
        title=_title(f"What a reduction buys ({ranks} ranks): unreduced, reduced, from scratch", profile),
        template="plotly_white",
        showlegend=False,
        width=1000,
        height=440,
    )
    return fig


__all__ = [
    "fig2a_loss_vs_latency",
    "fig2b_dense_equivalent",
    "fig4_all2all_vs_experts",
    "fig5_latency_vs_ranks",
    "payoff_bars",
    "protocol_note",
]
