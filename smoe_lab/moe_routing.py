"""Top-1 Switch routing as a pure function of the router logits (`top1_route`), with DeepSpeed-MoE's capacity
rule (`expert_capacity`) and load-balancing loss, the router z-loss, and the routing statistics of one call
(`MoETelemetry`). The layer that uses them is smoe_lab.moe.MoELayer; everything here is re-exported there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .router_health import RouterHealth, router_health


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's rule: ceil(tokens / experts * factor) computed in float32, at least min_capacity.

    float32 matters: e.g. 100 tokens, 2 experts, factor 1.2 gives 61 (50 * 1.2f = 60.000002). Host arithmetic
    (numpy float32, as torch multiplies a Python float by a float32 tensor): no tensor is read back.
    """
    cap = math.ceil(np.float32(num_tokens / num_experts) * np.float32(capacity_factor))
    return int(max(cap, min_capacity))


@dataclass
class Routing:
    """The result of top-1 routing for N tokens over E experts."""

    expert_index: Tensor  # [N] long: argmax expert (kept even when the token is dropped)
    gate: Tensor  # [N] float: softmax probability of that expert (differentiable)
    kept: Tensor  # [N] bool: processed by its expert (False: dropped by capacity, or padding)
    position: Tensor  # [N] long: position of the token in its expert's buffer (token order)
    capacity: int  # tokens an expert may process
    aux_loss: Tensor  # scalar: E * sum_i f_i * P_i (alpha NOT applied)
    routed_counts: Tensor  # [E] long: tokens whose argmax is each expert, before drops
    gates: Tensor  # [N, E] float: full softmax (for telemetry / entropy)
    num_real: int | None = None  # real (unmasked) tokens; None: all N

    @cached_property
    def processed_counts(self) -> Tensor:  # [E] long, computed once; no host sync (a scatter-add, not bincount)
        return count_per_expert(self.expert_index, self.routed_counts.numel(), self.kept)


def count_per_expert(expert_index: Tensor, num_experts: int, weight: Tensor | None = None) -> Tensor:
    """[E] long: tokens per expert (only those with weight True/1 when given). A scatter-add: unlike
    torch.bincount or boolean indexing it never reads a device value on the host (no CUDA sync)."""
    ones = torch.ones_like(expert_index) if weight is None else weight.to(expert_index.dtype)
    return torch.zeros(num_experts, dtype=torch.long, device=expert_index.device).scatter_add_(0, expert_index, ones)


def top1_route(
    logits: Tensor,
    capacity_factor: float,
    min_capacity: int,
    drop_tokens: bool = True,
    mask: Tensor | None = None,
) -> Routing:
    """Top-1 (Switch) routing with DeepSpeed-MoE's capacity and load-balancing loss.

    logits: [N, E]. mask: optional [N] bool, False for padding: padding is never routed and is excluded from
    the counts, the aux loss and the capacity (capacity uses the number of real tokens).

    Which tokens a full expert keeps: the first `capacity` in token order (cumulative count, as Switch/GShard).
    Aux loss: E * sum_i f_i P_i with f_i the fraction of tokens whose argmax is i and P_i the mean router
    probability of i. This is what DeepSpeed's top1gating computes; the paper's formula (Sec 2) omits the factor
    E. The caller multiplies by alpha (aux_loss_coef, 0.01).
    """
    if logits.dim() != 2:
        raise ValueError(f"top1_route: logits must be [N, E], got shape {tuple(logits.shape)}")
    n, e = logits.shape
    gates = F.softmax(logits.float(), dim=1)  # [N, E], fp32 like DeepSpeed
    expert_index = torch.argmax(gates, dim=1)  # [N]
    if mask is None:
        valid, n_valid = torch.ones(n, dtype=torch.bool, device=logits.device), n
    else:  # the one host read with a mask: DeepSpeed's capacity rule needs the number of real tokens
        valid = mask.reshape(n).bool()
        n_valid = int(valid.sum())

    routed_counts = count_per_expert(expert_index, e, valid)  # [E]
    # Aux loss over real tokens only: P_i = mean prob, f_i = routed share.
    denom = max(n_valid, 1)
    me = gates.mean(0) if mask is None else (gates * valid.unsqueeze(1)).sum(0) / denom  # [E]
    ce = routed_counts.to(gates.dtype) / denom  # [E]
    aux_loss = torch.sum(me * ce) * e

    # Position of each token in its expert's queue, in token order, without an [N, E] cumsum:
    # a stable sort by expert groups tokens per expert in token order; position = rank within the group.
    sort_key = torch.where(valid, expert_index, torch.full_like(expert_index, e))  # padding sorts last
    order = torch.sort(sort_key, stable=True).indices  # [N]
    group_sizes = count_per_expert(sort_key, e + 1)  # [E+1]
    group_start = torch.cumsum(group_sizes, 0) - group_sizes  # [E+1]
    position = torch.empty_like(expert_index)
    position[order] = torch.arange(n, device=logits.device) - group_start[sort_key[order]]

    if drop_tokens:
        capacity = expert_capacity(n_valid, e, capacity_factor, min_capacity)
        kept = valid & (position < capacity)
    else:  # capacity = the largest count, as DeepSpeed (a host read: no-drop routing is for evaluation)
        capacity = int(routed_counts.max()) if n_valid else 0
        kept = valid.clone()
    gate = gates.gather(1, expert_index.unsqueeze(1)).squeeze(1)  # [N]
    return Routing(expert_index, gate, kept, position, capacity, aux_loss, routed_counts, gates, n_valid)


def router_z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """ST-MoE's router z-loss: mean over real tokens of logsumexp(logits)^2 (coefficient not applied). [N, E] -> []"""
    z = torch.logsumexp(logits.float(), dim=1) ** 2  # [N]
    if mask is None:
        return z.mean()
    valid = mask.reshape(-1).to(z.dtype)
    return (z * valid).sum() / valid.sum().clamp_min(1.0)


@dataclass
class MoETelemetry:
    """Routing statistics of the last forward pass of one MoE layer (detached, real tokens only).

    Only tensors are stored in the forward pass (no host syncs on GPU); floats are derived on access.
    """

    router_logits: Tensor  # [N_real, E] (empty [0, E] when the layer's record_logits is False)
    router_probs: Tensor  # [N_real, E] softmax of the logits
    routed_counts: Tensor  # [E] before drops
    processed_counts: Tensor  # [E] after drops
    capacity: int

    @classmethod
    def of_call(
        cls,
        logits: Tensor,
        probs: Tensor,
        routed_counts: Tensor,
        processed_counts: Tensor,
        capacity: int,
        mask: Tensor | None = None,
        keep_logits: bool = True,
        num_real: int | None = None,
    ) -> MoETelemetry:
        """The telemetry of one call from its logits / probs [N, E] over every token (restricted here to the real
        ones: mask [N], None = all), counts [E] and capacity; detached. keep_logits False stores empty [0, E] logits.

        num_real: the number of real tokens when the caller already knows it (the capacity rule read it). Then the
        real tokens are selected without boolean indexing (a host sync on CUDA): a stable argsort puts them first and
        a slice of that static length selects them, in token order."""
        if mask is None:
            valid = slice(None)
        elif num_real is not None:
            valid = torch.argsort((~mask.bool()).to(torch.uint8), stable=True)[:num_real]
        else:
            valid = mask.bool()
        logits = logits.detach()
        return cls(
            router_logits=logits[valid] if keep_logits else logits.new_empty(0, logits.shape[1]),
            router_probs=probs.detach()[valid],
            routed_counts=routed_counts.detach(),
            processed_counts=processed_counts.detach(),
            capacity=int(capacity),
        )

    @property
    def num_tokens(self) -> int:
        return self.router_probs.shape[0]

    @property
    def dropped_fraction(self) -> float:
        return 1.0 - float(self.processed_counts.sum()) / max(self.num_tokens, 1)

    @property
    def router_entropy(self) -> float:
        """Mean entropy (nats) of the router distribution over real tokens."""
        p = self.router_probs
        return float(-(p * torch.log(p.clamp_min(1e-20))).sum(1).mean()) if self.num_tokens else 0.0

    @property
    def health(self) -> RouterHealth:
        """`smoe_lab.router_health.RouterHealth` of this forward pass (entropy / ln E, top-1 gate, shares, drops)."""
        return router_health(self.router_probs, self.routed_counts, self.processed_counts)
