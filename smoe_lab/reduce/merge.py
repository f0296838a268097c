"""Frequency-weighted merging of aligned experts (UNCURL Algorithm 1, lines 9-16: WeightedAverage)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .align import (
    BiasFreeExpertWeights,
    ExpertWeights,
    GatedExpertWeights,
    align_experts,
    check_bias_free_expert,
    check_expert,
    check_gated_expert,
    permute_expert,
)


def _check_same_shape(experts: Sequence[ExpertWeights]) -> None:
    if len(experts) < 1:
        raise ValueError("need at least one expert")
    if isinstance(experts[0], (GatedExpertWeights, BiasFreeExpertWeights)):
        return _check_same_layout(experts)
    shape = check_expert(experts[0], "experts[0]")
    for i, e in enumerate(experts[1:], start=1):
        if check_expert(e, f"experts[{i}]") != shape:
            raise ValueError(f"experts[{i}] has (d_model, d_ff) = {check_expert(e)}, experts[0] has {shape}")


def _check_same_layout(experts: Sequence[GatedExpertWeights | BiasFreeExpertWeights]) -> None:
    """Every expert has the layout (type) and field shapes of experts[0] (the Hugging Face layouts)."""
    kind = type(experts[0])
    check = check_gated_expert if kind is GatedExpertWeights else check_bias_free_expert
    shape = check(experts[0], "experts[0]")
    for i, e in enumerate(experts[1:], start=1):
        if type(e) is not kind:
            raise ValueError(f"experts[{i}] is {type(e).__name__}, experts[0] is {kind.__name__}")
        if check(e, f"experts[{i}]") != shape:
            raise ValueError(f"experts[{i}] has (d_model, d_ff) = {check(e)}, experts[0] has {shape}")


def _as_weights(weights: Sequence[float] | np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    """Validated float64 weights [n]: right length, finite, non-negative."""
    if isinstance(weights, torch.Tensor):
        w = weights.detach().cpu().to(torch.float64).reshape(-1)
    else:
        w = torch.from_numpy(np.array(weights, dtype=np.float64).reshape(-1))
    if w.numel() != n:
        raise ValueError(f"got {w.numel()} merge weights for {n} experts")
    if not torch.isfinite(w).all():
        raise ValueError("merge weights contain NaN or Inf")
    if (w < 0).any():
        raise ValueError("merge weights must be non-negative (they are activation frequencies)")
    return w  # [n]


def normalize_weights(weights: Sequence[float] | np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    """Merge weights [n] float64 summing to 1: non-negative finite weights normalised, uniform if all are zero.

    All-zero weights happen when no expert of a cluster was selected on the task data; the plain average is used.
    """
    w = _as_weights(weights, n)  # [n]
    total = w.sum()
    return w / total if total > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)


def stack_experts(
    experts: Sequence[ExpertWeights],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_in [E, d_model, d_ff], b_in [E, d_ff], w_out [E, d_ff, d_model], b_out [E, d_model]) as in MoELayer."""
    _check_same_shape(experts)
    return tuple(torch.stack([e[k] for e in experts]) for k in range(4))  # type: ignore[return-value]


def unstack_experts(
    w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor
) -> list[ExpertWeights]:
    """The E experts of a stacked layout (views, no copy); inverse of `stack_experts`."""
    if w_in.ndim != 3:
        raise ValueError(f"stacked w_in must be [E, d_model, d_ff], got shape {tuple(w_in.shape)}")
    E = w_in.shape[0]
    for name, t in (("b_in", b_in), ("w_out", w_out), ("b_out", b_out)):
        if t.shape[0] != E:
            raise ValueError(f"stacked {name} holds {t.shape[0]} experts, w_in holds {E}")
    experts = [ExpertWeights(w_in[e], b_in[e], w_out[e], b_out[e]) for e in range(E)]
    _check_same_shape(experts)
    return experts


def merge_experts(
    experts: Sequence[ExpertWeights], weights: Sequence[float] | np.ndarray | torch.Tensor
) -> ExpertWeights:
    """Weighted average of (already aligned) experts; weights as in `normalize_weights`.

    Accumulates in float64 and returns the first expert's dtype and layout (every field is averaged).
    """
    _check_same_shape(experts)
    w = normalize_weights(weights, len(experts))  # [E]
    dtype = experts[0][0].dtype
    kind = type(experts[0])  # ExpertWeights, or a Hugging Face layout (GatedExpertWeights, BiasFreeExpertWeights)
    stacked = (torch.stack([e[k] for e in experts]) for k in range(len(experts[0])))  # fields x [E, ...]
    merged = (torch.tensordot(w.to(t.device), t.to(torch.float64), dims=1).to(dtype) for t in stacked)
    return kind(*merged)


def merge_cluster(
    experts: Sequence[ExpertWeights],
    frequencies: Sequence[float] | np.ndarray | torch.Tensor,
    members: Sequence[int],
    centre: int,
    workers: int = 1,
) -> ExpertWeights:
    """One cluster of Algorithm 1 (lines 9-16): align every member to experts[centre], then frequency-average.

    experts: all Z experts of the layer; frequencies [Z]: their activation frequencies on the task;
    members: the cluster's expert indices (must contain centre); the centre expert is used unpermuted.
    """
    members, centre, Z = [int(m) for m in members], int(centre), len(experts)
    if len(members) < 1:
        raise ValueError("cluster has no members")
    if len(set(members)) != len(members):
        raise ValueError(f"cluster members repeat an expert: {members}")
    if any(not 0 <= m < Z for m in members):
        raise ValueError(f"cluster members must be expert indices in [0, {Z}), got {members}")
    if centre not in members:
        raise ValueError(f"centre expert {centre} is not a member of its cluster {members}")
    freq = _as_weights(frequencies, Z)  # [Z]
    others = [m for m in members if m != centre]
    perms = align_experts([experts[m] for m in others], experts[centre], workers=workers)
    aligned = {centre: experts[centre]} | {m: permute_expert(experts[m], p) for m, p in zip(others, perms)}
    return merge_experts([aligned[m] for m in members], freq[members])
