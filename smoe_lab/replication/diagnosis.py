"""Plain-language readings of the numbers behind a claim that is not supported: what the ablations say."""

from __future__ import annotations

import math

import pandas as pd

from .claims import FLOOR_MARGIN, Claim, learnable_tasks
from .stats import NOT_SUPPORTED, SUPPORTED, combine
from .study import label, protocols


def diagnose_a(gaps: pd.DataFrame, bud: pd.DataFrame, p, bt: pd.DataFrame | None = None) -> str:
    """Plain-language reading of the two (a) ablations, derived from the numbers."""
    if gaps.empty:
        return ""
    s = _protocol_reading(gaps, p) + _per_expert_reading(p)
    if not bud.empty:
        s += _curve_reading(bud)
    if bt is not None and len(bt):
        s += _retrained_reading(bt, p)
    return s + "\n"


def _protocol_reading(gaps: pd.DataFrame, p) -> str:
    """MoE - dense with and without drops per model, and whether drops at evaluation explain the gap."""
    paper = protocols(p)[0].name
    nodrop = protocols(p)[1].name
    out = []
    for model, g in gaps.groupby("model", sort=False):
        g = g.set_index("protocol")
        a = g.at[paper, "MoE - dense (nats)"] if paper in g.index else math.nan
        b = g.at[nodrop, "MoE - dense (nats)"] if nodrop in g.index else math.nan
        lo, hi = g["MoE - dense (nats)"].min(), g["MoE - dense (nats)"].max()
        out.append(
            f"{model}: {a:+.3f} with drops at cf 1.0 vs {b:+.3f} without drops (range over protocols "
            f"{lo:+.3f} .. {hi:+.3f})"
        )
    s = "Reading: " + "; ".join(out) + ". "
    by = {proto: gaps[gaps["protocol"] == proto].set_index("model")["MoE - dense (nats)"] for proto in (paper, nodrop)}
    shift = (by[paper] - by[nodrop]).abs()
    size = gaps[gaps["protocol"] == paper]["MoE - dense (nats)"].abs().max()
    if len(shift) and shift.max() < 0.25 * size:
        s += (
            f"Drops at evaluation are not the cause: turning them off moves the MoE - dense gap by at most "
            f"{shift.max():.3f} nats, under a quarter of the gap. "
        )
    elif len(shift):
        s += f"Drops at evaluation account for part of the gap (up to {shift.max():.3f} nats). "
    return s


def _per_expert_reading(p) -> str:
    per_expert = ", ".join(f"{label(e)} ~{p.tokens // e:,}" for e in sorted(p.variants) if e > 1)
    return (
        f"Each expert of an E-expert layer is trained on about 1/E of the {p.tokens:,} tokens ({per_expert} tokens "
        "per expert, before drops), while the dense FFN sees all of them. "
    )


def _curve_reading(bud: pd.DataFrame) -> str:
    """Whether the MoE - dense gap shrank over the second half of training (periodic evaluation)."""
    last = bud["tokens"].max()
    half = bud[bud["tokens"] >= last / 2]["tokens"].min()
    moves = {
        m: (g[g["tokens"] == half]["gap"].iloc[0], g[g["tokens"] == last]["gap"].iloc[0], g["gap"].max())
        for m, g in bud.groupby("model", sort=False)
    }
    change = ", ".join(f"{m} {a:+.3f} -> {b:+.3f} (peak {c:+.3f})" for m, (a, b, c) in moves.items())
    if all(b < a for a, b, _ in moves.values()):
        return (
            f"Over the second half of training ({half:,} -> {last:,} tokens) the MoE - dense gap shrank for every "
            f"variant ({change} nats) as the learning rate decayed. "
        )
    return (
        f"Over the second half of training ({half:,} -> {last:,} tokens) the MoE - dense gap did not shrink "
        f"for every variant ({change} nats). "
    )


def _retrained_reading(bt: pd.DataFrame, p) -> str:
    """What the retrained budgets say (paper protocol): does more training close the gap?"""
    s = ""
    primary = bt[(bt["protocol"] == protocols(p)[0].name) & (bt["tokens per model"] != p.tokens)]
    for r in primary.itertuples(index=False):
        gap, change, closes = r[3], r[4], r[6]
        s += (
            f"Retrained with {r[1]:,} tokens (seeds {r[2]}): {label(max(p.variants))} - dense = {gap} nats, a "
            f"change of {change} nats against the same seeds at {p.tokens:,} tokens ('more tokens close the "
            f"gap': {closes}). "
        )
        if closes == SUPPORTED:
            s += "More training closes part of the gap: the budget is a likely cause. "
        elif closes == NOT_SUPPORTED:
            s += (
                "More training widens the gap: the dense model gains more from the extra tokens than the SMoE, so "
                "the training budget alone does not explain (a) at this model size (a budget orders of magnitude "
                "larger, as in the paper, may still behave differently). "
            )
    return s


def diagnose_task(c: Claim, df: pd.DataFrame, p) -> str:
    low = [t for t in p.tasks if t not in learnable_tasks(df, p)]
    s = f"(**{c.verdict}** at this scale.) "
    if low:
        s += (
            f"On {', '.join(low)} no model clears the majority-class floor by more than {FLOOR_MARGIN:g} points, so "
            "that task is left out of the verdict by the floor rule (its cells are in the details). "
        )
    s += (
        "Likely cause on the remaining tasks: the differences between models are a point or two, the size of the "
        "evaluation noise (256 validation examples: ~3 points sd per model), and finetuning may repair what a "
        "reduction loses; the ablation without finetuning above removes the second. "
    )
    sec = combine([x.verdict for x in c.secondary]) if c.secondary else None
    if sec is not None:
        s += f"The secondary readout (validation loss) gives '{sec}'. "
    return s + "\n"
