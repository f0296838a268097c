"""Top-1 Switch routing and the stacked-expert MoE layer.

Routing is a pure function of the router logits (`top1_route`) with DeepSpeed-MoE's capacity rule and
load-balancing loss. Experts are stacked tensors (w_in [E, d_model, d_ff] ...) so that merging and
compaction are tensor operations, and the forward pass is sort-free index dispatch + two batched matmuls:
no [tokens, experts, capacity] one-hot tensors, activation memory grows with tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .router_health import RouterHealth, router_health


def gelu(x: Tensor) -> Tensor:
    """GPT-2's GELU (tanh approximation)."""
    return F.gelu(x, approximate="tanh")


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's rule: ceil(tokens / experts * factor) computed in float32, at least min_capacity.

    float32 matters: e.g. 100 tokens, 2 experts, factor 1.2 gives 61 (50 * 1.2f = 60.000002).
    """
    cap = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor)).to(torch.int64)
    return int(max(int(cap), min_capacity))


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

    @property
    def processed_counts(self) -> Tensor:  # [E]
        return torch.bincount(self.expert_index[self.kept], minlength=self.routed_counts.numel())


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
    valid = torch.ones(n, dtype=torch.bool, device=logits.device) if mask is None else mask.reshape(n).bool()
    n_valid = int(valid.sum())

    routed_counts = torch.bincount(expert_index[valid], minlength=e)  # [E]
    # Aux loss over real tokens only: P_i = mean prob, f_i = routed share.
    denom = max(n_valid, 1)
    me = gates.mean(0) if mask is None else (gates * valid.unsqueeze(1)).sum(0) / denom  # [E]
    ce = routed_counts.to(gates.dtype) / denom  # [E]
    aux_loss = torch.sum(me * ce) * e

    # Position of each token in its expert's queue, in token order, without an [N, E] cumsum:
    # a stable sort by expert groups tokens per expert in token order; position = rank within the group.
    sort_key = torch.where(valid, expert_index, torch.full_like(expert_index, e))  # padding sorts last
    order = torch.sort(sort_key, stable=True).indices  # [N]
    group_sizes = torch.bincount(sort_key, minlength=e + 1)  # [E+1]
    group_start = torch.cumsum(group_sizes, 0) - group_sizes  # [E+1]
    position = torch.empty_like(expert_index)
    position[order] = torch.arange(n, device=logits.device) - group_start[sort_key[order]]

    if drop_tokens:
        capacity = expert_capacity(n_valid, e, capacity_factor, min_capacity)
        kept = valid & (position < capacity)
    else:
        capacity = int(routed_counts.max()) if n_valid else 0
        kept = valid.clone()
    gate = gates.gather(1, expert_index.unsqueeze(1)).squeeze(1)  # [N]
    return Routing(expert_index, gate, kept, position, capacity, aux_loss, routed_counts, gates)


class Experts(nn.Module):
    """E two-layer GELU FFNs as stacked parameters; expert e: gelu(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b_in = nn.Parameter(torch.zeros(num_experts, d_ff))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model))

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    def forward_padded(self, xb: Tensor) -> Tensor:
        """xb: [E, C, d_model] -> [E, C, d_model]; bias adds fused into the batched matmuls (baddbmm)."""
        h = gelu(torch.baddbmm(self.b_in.unsqueeze(1), xb, self.w_in))  # [E, C, d_ff]
        return torch.baddbmm(self.b_out.unsqueeze(1), h, self.w_out)  # [E, C, d_model]

    def forward_grouped(self, xs: Tensor, counts: list[int]) -> Tensor:
        """xs [M, d_model] sorted by expert (counts[e] rows for expert e) -> [M, d_model]; no padding.

        One addmm per expert on its slice; the stacked weights are unbound once, so the backward stacks the
        per-expert gradients in one op (indexing w_in[e] would allocate a full-size zero gradient per expert).
        """
        w_in, b_in, w_out, b_out = (t.unbind(0) for t in (self.w_in, self.b_in, self.w_out, self.b_out))
        parts = xs.split(counts)
        outs = [
            torch.addmm(b_out[e], gelu(torch.addmm(b_in[e], part, w_in[e])), w_out[e])
            for e, part in enumerate(parts)
            if part.shape[0]
        ]
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[1])

    def forward_one(self, e: int, x: Tensor) -> Tensor:
        """Expert e on x [n, d_model] (reference path)."""
        return gelu(x @ self.w_in[e] + self.b_in[e]) @ self.w_out[e] + self.b_out[e]


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


class MoELayer(nn.Module):
    """Top-1 Switch MoE FFN. `.router` is nn.Linear(d_model, E, bias=False); `.experts` holds the stacked FFNs.

    forward(x [B, T, C], mask [B, T] | None) -> [B, T, C]. A kept token's output is gate * expert(x); a dropped
    token's output is zero (the residual stream carries it). The load-balancing loss of the last call is in
    `.aux_loss` (alpha not applied) and routing statistics in `.telemetry`.

    Router options that help routers learn (off by default, see docs/routers.md): router_jitter multiplies the
    router's input (not the experts') by uniform(1 - eps, 1 + eps) noise in training (Switch, Fedus et al. 2021);
    router_z_loss_coef > 0 makes the layer keep `.z_loss`, the mean over real tokens of logsumexp(logits)^2
    (ST-MoE, Zoph et al. 2022; the coefficient is applied by GPT.aux_loss).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        capacity_factor_train: float = 1.2,
        capacity_factor_eval: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        router_jitter: float = 0.0,
        router_z_loss_coef: float = 0.0,
    ):
        super().__init__()
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.router_jitter = router_jitter
        self.router_z_loss_coef = router_z_loss_coef
        self.z_loss: Tensor | None = None
        self.experts = Experts(num_experts, d_model, d_ff)
        self.capacity_factor_train = capacity_factor_train
        self.capacity_factor_eval = capacity_factor_eval
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.aux_loss: Tensor | None = None
        self.telemetry: MoETelemetry | None = None
        self.record_logits = True

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def capacity_factor(self) -> float:
        return self.capacity_factor_train if self.training else self.capacity_factor_eval

    def route(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Routing]:
        """x [N, C] -> (logits [N, E], Routing). Keeps `.z_loss` when router_z_loss_coef > 0."""
        if self.training and self.router_jitter > 0:  # Switch's input jitter: the router's input only
            eps = self.router_jitter
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        logits = self.router(x)  # [N, E]
        if self.router_z_loss_coef > 0:
            self.z_loss = router_z_loss(logits, mask)
        return logits, top1_route(logits, self.capacity_factor, self.min_capacity, self.drop_tokens, mask)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # [N, C]
        flat_mask = None if mask is None else mask.reshape(-1)
        logits, r = self.route(xf, flat_mask)
        y = dispatch_combine(self.experts, xf, r)  # [N, C]
        self._record(logits, r, flat_mask)
        return y.reshape(shape)

    def _record(self, logits: Tensor, r: Routing, mask: Tensor | None) -> None:
        self.aux_loss = r.aux_loss
        valid = slice(None) if mask is None else mask.bool()
        logits = logits.detach()
        self.telemetry = MoETelemetry(
            router_logits=logits[valid] if self.record_logits else logits.new_empty(0, logits.shape[1]),
            router_probs=r.gates.detach()[valid],
            routed_counts=r.routed_counts.detach(),
            processed_counts=r.processed_counts,
            capacity=r.capacity,
        )


GROUPED_MIN_TOKENS = 96  # mean tokens per expert from which the unpadded grouped path is faster on CPU


class _GatherRows(torch.autograd.Function):
    """y = x[fwd_idx] whose backward is also a gather: grad_x = grad_y[bwd_idx] * bwd_mask.

    Exact when every x row feeds at most one y row with a non-zero gradient (bwd_idx points at that row, bwd_mask
    is False where there is none) - true for top-1 dispatch and combine. It replaces the scatter-add backward of
    index_select, the largest dispatch cost on CPU.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fwd_idx: Tensor, bwd_idx: Tensor, bwd_mask: Tensor) -> Tensor:
        ctx.save_for_backward(bwd_idx, bwd_mask)
        return x.index_select(0, fwd_idx)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        bwd_idx, bwd_mask = ctx.saved_tensors
        grad_x = grad_y.index_select(0, bwd_idx) * bwd_mask.unsqueeze(1).to(grad_y.dtype)
        return grad_x, None, None, None


@dataclass
class DispatchPlan:
    """Where each kept token goes in the padded [E, C', d] expert buffer (see `dispatch`)."""

    slot: Tensor  # [N] buffer slot of each token (0 for dropped tokens, whose output is scaled by 0)
    src: Tensor  # [E*C'] token feeding each slot (0 for unused slots, whose outputs are never read)
    filled: Tensor  # [E*C'] bool: slot holds a kept token
    capacity: int  # C'


def plan_dispatch(r: Routing, num_experts: int) -> DispatchPlan | None:
    """Slots in a padded buffer of C' = the largest kept count of any expert (<= capacity); None if nothing kept."""
    kept = r.kept
    counts = torch.bincount(r.expert_index[kept], minlength=num_experts)  # [E]
    c = int(counts.max()) if kept.numel() else 0
    if c == 0:
        return None
    slot = torch.where(kept, r.expert_index * c + r.position, torch.zeros_like(r.position))  # [N]
    src = torch.zeros(num_experts * c, dtype=torch.long, device=kept.device)  # [E*C']
    src[slot[kept]] = torch.nonzero(kept).squeeze(1)
    filled = torch.zeros(num_experts * c, dtype=torch.bool, device=kept.device)  # [E*C']
    filled[slot[kept]] = True
    return DispatchPlan(slot, src, filled, c)


def dispatch(x: Tensor, r: Routing, plan: DispatchPlan) -> Tensor:
    """x [N, d] -> expert buffer [E, C', d] (a row gather both ways, see _GatherRows)."""
    e = plan.src.numel() // plan.capacity
    return _GatherRows.apply(x, plan.src, plan.slot, r.kept).view(e, plan.capacity, x.shape[1])


def combine(yb: Tensor, r: Routing, plan: DispatchPlan) -> Tensor:
    """Expert outputs [E, C', d] -> [N, d], each kept token scaled by its gate, dropped tokens 0."""
    scale = (r.gate * r.kept).to(yb.dtype).unsqueeze(1)  # [N, 1]
    return _GatherRows.apply(yb.reshape(-1, yb.shape[-1]), plan.slot, plan.src, plan.filled) * scale


@dataclass
class GroupPlan:
    """Kept tokens sorted by expert (token order within an expert), for the unpadded grouped path."""

    order: Tensor  # [M] token index of each sorted row
    inverse: Tensor  # [N] sorted row of each token (0 for dropped tokens, whose output is scaled by 0)
    counts: list[int]  # [E] rows per expert
    all_rows: Tensor  # [M] bool, all True (every sorted row belongs to a kept token)


def plan_groups(r: Routing, num_experts: int) -> GroupPlan | None:
    kept = r.kept
    key = torch.where(kept, r.expert_index, torch.full_like(r.expert_index, num_experts))  # dropped sort last
    m = int(kept.sum())
    if m == 0:
        return None
    order = torch.sort(key, stable=True).indices[:m]  # [M]
    inverse = torch.zeros_like(r.expert_index)
    inverse[order] = torch.arange(m, device=order.device)
    counts = torch.bincount(key[order], minlength=num_experts).tolist()
    return GroupPlan(order, inverse, counts, torch.ones(m, dtype=torch.bool, device=order.device))


def dispatch_combine(experts: Experts, x: Tensor, r: Routing, grouped: bool | None = None) -> Tensor:
    """Run each kept token through its expert, scale by its gate; dropped tokens get zeros. x [N, d] -> [N, d].

    grouped: tokens sorted by expert, one matmul pair per expert on its exact slice, no padding.
    padded: a [E, C', d] buffer with C' = the largest kept count and two batched matmuls (one kernel each, at the
    price of computing C' - count_e padding rows per expert).
    Default (grouped=None): grouped on CPU while experts get >= GROUPED_MIN_TOKENS tokens on average (few large
    matmuls beat the padding), padded otherwise and on CUDA (many small per-expert calls cost more than padding;
    measured in benchmarks/bench_moe.py, see the README's Performance section).
    Either way dispatch and combine are row gathers in both directions (_GatherRows) and no [tokens, experts,
    capacity] tensor exists: memory grows with tokens only.
    """
    if grouped is None:
        grouped = x.device.type == "cpu" and x.shape[0] >= GROUPED_MIN_TOKENS * experts.num_experts
    if grouped:
        gp = plan_groups(r, experts.num_experts)
        if gp is None:
            return x.new_zeros(x.shape)
        xs = _GatherRows.apply(x, gp.order, gp.inverse, r.kept)  # [M, d]
        ys = experts.forward_grouped(xs, gp.counts)  # [M, d]
        scale = (r.gate * r.kept).to(ys.dtype).unsqueeze(1)  # [N, 1]
        return _GatherRows.apply(ys, gp.inverse, gp.order, gp.all_rows) * scale
    plan = plan_dispatch(r, experts.num_experts)
    if plan is None:
        return x.new_zeros(x.shape)
    return combine(experts.forward_padded(dispatch(x, r, plan)), r, plan)


def moe_reference(experts: Experts, x: Tensor, r: Routing) -> Tensor:
    """The simple oracle: loop over experts with boolean masks. x [N, d] -> [N, d]."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        sel = r.kept & (r.expert_index == e)
        if sel.any():
            out[sel] = r.gate[sel].unsqueeze(1).to(x.dtype) * experts.forward_one(e, x[sel])
    return out


def router_z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """ST-MoE's router z-loss: mean over real tokens of logsumexp(logits)^2 (coefficient not applied). [N, E] -> []"""
    z = torch.logsumexp(logits.float(), dim=1) ** 2  # [N]
    if mask is None:
        return z.mean()
    valid = mask.reshape(-1).to(z.dtype)
    return (z * valid).sum() / valid.sum().clamp_min(1.0)


def init_moe_(
    layer: MoELayer, n_layer: int, generator: torch.Generator | None = None, router_std: float = 0.02
) -> None:
    """GPT-2 init: normal(0, 0.02); the residual projection (w_out) scaled by 1/sqrt(2 n_layer); biases zero.

    router_std: the router's std (ModelConfig.router_init_std, 0.02 by default); the draws are the same either way.
    """
    std = 0.02
    with torch.no_grad():
        layer.router.weight.normal_(0.0, router_std, generator=generator)
        layer.experts.w_in.normal_(0.0, std, generator=generator)
        layer.experts.w_out.normal_(0.0, std / math.sqrt(2 * n_layer), generator=generator)
        layer.experts.b_in.zero_()
        layer.experts.b_out.zero_()


def reinit_router_(layer: MoELayer, seed: int) -> None:
    """Re-initialise a router with the same rule as at pretraining (normal 0.02), from a seed."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        w = torch.empty(layer.router.weight.shape).normal_(0.0, 0.02, generator=g)
        layer.router.weight.copy_(w)
