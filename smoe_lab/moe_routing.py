"""Top-1 Switch routing as a pure function of the router logits (`top1_route`), with DeepSpeed-MoE's capacity
rule (`expert_capacity`) and load-balancing loss, the router z-loss, and the routing statistics of one call
(`MoETelemetry`). The layer that uses them is smoe_lab.moe.MoELayer; everything here is re-exported there.

Softmax, top-1 gate and mean router probability are one autograd node with a closed-form backward
(`_Top1Softmax`), laid out [E, N] below 16 experts; `top1_route_reference` is the plain-autograd oracle that
tests and `benchmarks/bench_moe.py --routing` compare it with.
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
    if mask is None:
        valid, n_valid = None, n
    else:  # the one host read with a mask: DeepSpeed's capacity rule needs the number of real tokens
        valid = mask.reshape(n).bool()
        n_valid = int(valid.sum())
    # Aux loss over real tokens only: P_i = mean prob (me), f_i = routed share (ce).
    denom = max(n_valid, 1)
    gates, gate, expert_index, me = _Top1Softmax.apply(logits, valid, denom)
    routed_counts = count_per_expert(expert_index, e, valid)  # [E]
    ce = routed_counts.to(me.dtype) / denom  # [E]
    aux_loss = torch.dot(me, ce) * e

    position = queue_position(expert_index, e, valid)
    if drop_tokens:
        capacity = expert_capacity(n_valid, e, capacity_factor, min_capacity)
        kept = position < capacity
        if valid is not None:
            kept &= valid
    else:  # capacity = the largest count, as DeepSpeed (a host read: no-drop routing is for evaluation)
        capacity = int(routed_counts.max()) if n_valid else 0
        kept = torch.ones(n, dtype=torch.bool, device=logits.device) if valid is None else valid.clone()
    return Routing(expert_index, gate, kept, position, capacity, aux_loss, routed_counts, gates, n_valid)


# Below this many experts the softmax, the argmax and the queue positions run in the [E, N] layout: torch's CPU
# kernels reducing over a last dimension of 8 are several times slower than over the first (softmax of [4096, 8]
# 262 us, of [8, 4096] 75 us on the 2-core machine); from 16 experts on the [N, E] layout is the faster one.
# `python benchmarks/bench_moe.py --routing` times top1_route against top1_route_reference.
_FEW_EXPERTS = 16


class _Top1Softmax(torch.autograd.Function):
    """logits [N, E] -> (gates [N, E] softmax in at least fp32, gate [N] its largest value, expert_index [N] the
    first index of that value, me [E] the mean of gates over real tokens); valid [N] bool (None: all real).

    One node with a closed-form backward instead of softmax -> gather -> mean: with G = dL/dgates (the gate's and
    me's gradients scattered into [N, E]), dL/dlogits = p * (G - <G, p>) row by row, computed in two passes over
    [N, E] and a scatter, without materialising G (autograd's version builds four [N, E] temporaries).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, valid: Tensor | None, denom: int):
        lf = logits if logits.dtype == torch.float64 else logits.float()  # fp32 like DeepSpeed (fp64 kept)
        valid_w = None if valid is None else valid.to(lf.dtype)  # [N] 0/1
        t = logits.shape[1] < _FEW_EXPERTS
        with torch.autocast(logits.device.type, enabled=False):  # the masked mean is a matmul: keep it in fp32
            if t:  # work on [E, N]; gates is handed out as its [N, E] view
                pt = F.softmax(lf.t(), dim=0)  # [E, N]
                gate, expert_index = pt.max(0)  # the first maximal index, as argmax
                me = pt.mean(1) if valid_w is None else pt @ valid_w / denom  # [E]
                gates = pt.t()
            else:
                gates = F.softmax(lf, dim=1)  # [N, E]
                gate, expert_index = gates.max(1)
                me = gates.mean(0) if valid_w is None else valid_w @ gates / denom
        ctx.save_for_backward(gates, gate, expert_index, valid_w)
        ctx.denom, ctx.transposed, ctx.logits_dtype = denom, t, logits.dtype
        ctx.mark_non_differentiable(expert_index)
        ctx.set_materialize_grads(False)
        return gates, gate, expert_index, me

    @staticmethod
    def backward(ctx, g_gates, g_gate, _g_index, g_me):
        p, gate, expert_index, valid_w = ctx.saved_tensors
        t = ctx.transposed
        pc = p.t() if t else p  # p in its contiguous layout: [E, N] or [N, E]
        row = (lambda v: v[None, :]) if t else (lambda v: v[:, None])  # [N] -> broadcast along the tokens
        col = (lambda v: v[:, None]) if t else (lambda v: v[None, :])  # [E] -> broadcast along the experts
        # G[n, j] = valid[n] * g_me[j] / denom + [j == expert_index[n]] * g_gate[n] (+ g_gates[n, j])
        c = g_me / ctx.denom if g_me is not None else p.new_zeros(p.shape[1])  # [E]
        s = torch.mv(p, c)  # [N]: <G[n], p[n]>, built up term by term
        if valid_w is not None:
            s = s * valid_w
        picked = gate * g_gate if g_gate is not None else None  # [N]: p[n, k] * g_gate[n]
        if picked is not None:
            s = s + picked
        if g_gates is not None:
            s = s + torch.linalg.vecdot(g_gates, p, dim=1)
        dl = pc * col(c) if valid_w is None else pc * (col(c) * row(valid_w))
        dl.addcmul_(pc, row(s), value=-1.0)
        if g_gates is not None:
            dl.addcmul_(pc, g_gates.t() if t else g_gates)
        if picked is not None:
            dl.scatter_add_(0 if t else 1, row(expert_index), row(picked))
        dl = dl.t() if t else dl
        return dl.to(ctx.logits_dtype), None, None


def queue_position(expert_index: Tensor, num_experts: int, valid: Tensor | None = None) -> Tensor:
    """[N] long: the position of each token in its expert's queue, in token order (padding: valid False, any value).

    Few experts: a cumulative count over the [E, N] one-hot (cheapest up to ~16 experts); more: a stable sort by
    expert groups tokens per expert in token order and the position is the rank within the group. No [N, E]
    cumsum at many experts, no host read either way.
    """
    n, e = expert_index.numel(), num_experts
    key = expert_index if valid is None else torch.where(valid, expert_index, e)  # padding: queue E, last
    if e < _FEW_EXPERTS:
        queues = torch.arange(e + 1, device=key.device)[:, None] == key[None, :]  # [E+1, N]
        return queues.cumsum(1, dtype=torch.int32).gather(0, key[None, :])[0].long() - 1
    order = torch.sort(key, stable=True).indices  # [N]
    group_sizes = count_per_expert(key, e + 1)  # [E+1]
    group_start = torch.cumsum(group_sizes, 0) - group_sizes  # [E+1]
    rank = torch.arange(n, device=key.device).sub_(group_start[key[order]])  # [N] in sorted order
    return torch.empty_like(key).scatter_(0, order, rank)


def top1_route_reference(
    logits: Tensor, capacity_factor: float, min_capacity: int, drop_tokens: bool = True, mask: Tensor | None = None
) -> Routing:
    """The plain-autograd oracle of `top1_route` (softmax, argmax, gather, mean; a sort for queue positions): the
    same Routing, values and gradients, built the obvious way. Tests and benchmarks compare against it."""
    n, e = logits.shape
    lf = logits if logits.dtype == torch.float64 else logits.float()
    gates = F.softmax(lf, dim=1)  # [N, E]
    expert_index = torch.argmax(gates, dim=1)  # [N]
    valid = torch.ones(n, dtype=torch.bool, device=logits.device) if mask is None else mask.reshape(n).bool()
    n_valid = int(valid.sum())
    routed_counts = count_per_expert(expert_index, e, valid)
    denom = max(n_valid, 1)
    me = (gates * valid.unsqueeze(1)).sum(0) / denom  # [E]
    aux_loss = torch.sum(me * routed_counts.to(gates.dtype) / denom) * e
    key = torch.where(valid, expert_index, e)
    order = torch.sort(key, stable=True).indices
    group_sizes = count_per_expert(key, e + 1)
    group_start = torch.cumsum(group_sizes, 0) - group_sizes
    position = torch.empty_like(expert_index)
    position[order] = torch.arange(n, device=logits.device) - group_start[key[order]]
    if drop_tokens:
        capacity = expert_capacity(n_valid, e, capacity_factor, min_capacity)
        kept = valid & (position < capacity)
    else:
        capacity, kept = (int(routed_counts.max()) if n_valid else 0), valid.clone()
    gate = gates.gather(1, expert_index.unsqueeze(1)).squeeze(1)
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
