"""Router health: is each MoE layer actually routing, or is it a near-uniform mixture that barely contributes?

A top-1 Switch layer outputs gate x expert(x). While the router is close to uniform (entropy ~ ln E, top-1 gate
~ 1/E) every token gets ~1/E of one expert's output: the layer contributes about 1/E of an FFN and its experts
are interchangeable, so any reduction method "works" on it. These numbers say which regime a model is in:

    entropy_ratio  mean per-token entropy of the router softmax / ln E   (1 = uniform, 0 = one-hot)
    top1_gate      mean probability of the chosen expert                  (1/E = uniform, 1 = one-hot)
    max_share      largest expert's share of tokens (top-1, before drops) (1/E = balanced)
    min_share      smallest expert's share of tokens                      (0 = an expert nobody uses)
    drop_frac      share of tokens dropped by the capacity limit

One pure function computes them from sums (`health_from_sums`), so a single forward pass (`router_health`), a
training log row (`MoETelemetry.health`), a calibration artifact and a reduction report all report the same
numbers. `HealthMeter` accumulates the sums over many forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

WARN_ENTROPY_RATIO = 0.8  # above this at the end of training, the routers did not specialise
FIELDS = ("entropy_ratio", "top1_gate", "max_share", "min_share", "drop_frac")


@dataclass(frozen=True)
class RouterHealth:
    """Routing statistics of one MoE layer over some tokens (see the module docstring)."""

    num_experts: int
    num_tokens: int
    entropy: float  # nats, mean over tokens
    top1_gate: float
    max_share: float
    min_share: float
    drop_frac: float

    @property
    def entropy_ratio(self) -> float:
        """entropy / ln E (0 for a single expert, whose router has nothing to choose)."""
        return self.entropy / math.log(self.num_experts) if self.num_experts > 1 else 0.0

    def specialised(self, threshold: float = WARN_ENTROPY_RATIO) -> bool:
        return self.entropy_ratio <= threshold

    def as_dict(self, decimals: int = 4) -> dict[str, float]:
        d = {k: round(v, decimals) if isinstance(v, float) else v for k, v in asdict(self).items()}
        d["entropy_ratio"] = round(self.entropy_ratio, decimals)
        return d


def health_from_sums(
    entropy_sum: float,
    gate_sum: float,
    routed_counts: Tensor,
    processed_counts: Tensor | None,
    num_tokens: int,
) -> RouterHealth:
    """The one place the numbers are defined. routed_counts [E] (top-1, before drops); processed_counts [E] (after
    drops; None = nothing dropped); sums over num_tokens tokens of the per-token entropy and top-1 probability."""
    e = int(routed_counts.numel())
    n = max(int(num_tokens), 1)
    share = routed_counts.double() / n  # [E]
    processed = int(routed_counts.sum()) if processed_counts is None else int(processed_counts.sum())
    return RouterHealth(
        num_experts=e,
        num_tokens=int(num_tokens),
        entropy=float(entropy_sum) / n,
        top1_gate=float(gate_sum) / n,
        max_share=float(share.max()) if e else 0.0,
        min_share=float(share.min()) if e else 0.0,
        drop_frac=(1.0 - processed / n) if num_tokens else 0.0,
    )


def entropy_and_gate_sums(probs: Tensor) -> tuple[float, float]:
    """probs [N, E] (softmax rows) -> (sum of per-token entropies in nats, sum of top-1 probabilities)."""
    p = probs.double()
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(1)  # [N]
    return float(entropy.sum()), float(p.max(1).values.sum()) if p.shape[0] else 0.0


def router_health(probs: Tensor, routed_counts: Tensor | None = None, processed_counts: Tensor | None = None):
    """Health of one layer from one forward pass: probs [N, E] of the real tokens; counts [E] (default: the argmax
    counts of probs, nothing dropped)."""
    if probs.dim() != 2:
        raise ValueError(f"router_health: probs must be [N, E], got shape {tuple(probs.shape)}")
    if routed_counts is None:
        routed_counts = torch.bincount(probs.argmax(1), minlength=probs.shape[1])
    ent, gate = entropy_and_gate_sums(probs)
    return health_from_sums(
        ent, gate, routed_counts.cpu(), None if processed_counts is None else processed_counts.cpu(), probs.shape[0]
    )


def health_from_logits(logits: Tensor) -> RouterHealth:
    """Health of router logits [N, E] (softmax taken here; nothing dropped)."""
    return router_health(torch.softmax(logits.double(), dim=1))


class HealthMeter:
    """Accumulates per-layer router health over forward passes: `update(model.telemetry())` after each one."""

    def __init__(self) -> None:
        self._sums: list[list] | None = None

    def update(self, telemetry: list) -> None:
        tel = [t for t in telemetry if t is not None]
        if self._sums is None:
            self._sums = [
                [0.0, 0.0, torch.zeros_like(t.routed_counts.cpu()), torch.zeros_like(t.routed_counts.cpu()), 0]
                for t in tel
            ]
        for s, t in zip(self._sums, tel):
            ent, gate = entropy_and_gate_sums(t.router_probs)
            s[0] += ent
            s[1] += gate
            s[2] += t.routed_counts.cpu()
            s[3] += t.processed_counts.cpu()
            s[4] += t.num_tokens

    def result(self) -> list[RouterHealth]:
        return [health_from_sums(*s) for s in (self._sums or [])]


def metered(batches: Iterable, model, meter: HealthMeter) -> Iterator:
    """Yield `batches` unchanged; after the consumer has run the model on a batch (i.e. when it asks for the next one,
    or finishes), add `model.telemetry()` to `meter`. Lets an evaluation loop measure router health untouched."""
    for b in batches:
        yield b
        meter.update(model.telemetry())


def health_row(healths: list[RouterHealth], decimals: int = 4) -> dict[str, list[float]]:
    """{field: [value per MoE layer]} for a metrics.jsonl row (FIELDS, plus router_entropy in nats)."""
    if not healths:
        return {}
    row = {"router_entropy": [round(h.entropy, decimals) for h in healths]}
    for k in FIELDS:
        row[k] = [round(getattr(h, k), decimals) for h in healths]
    return row


def last_health(metrics: list[dict]) -> dict[str, list[float]]:
    """{field: [value per MoE layer]} of a run's metrics.jsonl rows: the last evaluation (validation data, eval mode)
    with router health, else the last training row with it, else {} (a dense model)."""
    for kind in ("eval", "train"):
        found = [r for r in metrics if r.get("kind") == kind and "entropy_ratio" in r]
        if found:
            return {k: found[-1][k] for k in FIELDS if k in found[-1]}
    return {}


def specialisation_warning(entropy_ratios: list[float], threshold: float = WARN_ENTROPY_RATIO) -> str | None:
    """The plain warning for a model whose routers stayed near uniform, or None when every layer is below it."""
    bad = [(i, r) for i, r in enumerate(entropy_ratios) if r > threshold]
    if not bad:
        return None
    where = ", ".join(f"MoE layer {i}: {r:.2f}" for i, r in bad)
    return (
        f"routers did not specialise: each MoE layer contributes ~1/E of an FFN (router entropy / ln E above "
        f"{threshold} in {where}); see docs/routers.md for a router recipe"
    )


def describe(h: RouterHealth) -> str:
    """One line for info boxes: 'entropy 0.42 ln E, top-1 gate 0.71, shares 0.3%-9.1%, dropped 1.2%'."""
    return (
        f"router entropy {h.entropy_ratio:.2f} ln E, top-1 gate {h.top1_gate:.2f}, expert shares "
        f"{h.min_share:.1%}-{h.max_share:.1%}, dropped {h.drop_frac:.1%}"
    )
