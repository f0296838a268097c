"""Top-1 Switch routing and the stacked-expert MoE layer.

Routing is a pure function of the router logits (`top1_route`) with DeepSpeed-MoE's capacity rule and
load-balancing loss. Experts are stacked tensors (w_in [E, d_model, d_ff] ...) so that merging and
compaction are tensor operations. Dispatch and combine are row gathers in both directions; no
[tokens, experts, capacity] one-hot tensor exists, so activation memory grows with tokens only.

Expert paths (`resolve_path`; switch: MoELayer.expert_path, $SMOE_LAB_MOE_PATH, CUDA_DEFAULT_PATH):
"grouped" (CPU default: exact per-expert slices, pooled gradient buffers), "padded" (a static
[E, capacity, d] buffer, two baddbmm; CUDA default) and "grouped_mm" (torch._grouped_mm).

Host syncs: the training forward + backward of the "padded" and "grouped_mm" paths reads no device value on
the host (counts are scatter-adds, never bincount or boolean indexing; the capacity is host arithmetic on the
token count; the padded buffer has the static capacity, not the largest kept count). What remains, by design:
with a padding mask, one read of the number of real tokens (DeepSpeed's capacity rule needs it);
drop_tokens=False reads the largest count (its capacity, as DeepSpeed); the "grouped" path reads the per-expert
counts (free on CPU). Telemetry stores tensors; its floats (dropped fraction, entropy) sync only when read.
Checked by tests/test_moe.py (aten ops recorded on CPU) and benchmarks/check_sync.py (CUDA sync debug mode).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
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

    @property
    def processed_counts(self) -> Tensor:  # [E] long, no host sync (a scatter-add, not bincount of a selection)
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


class Experts(nn.Module):
    """E two-layer GELU FFNs as stacked parameters; expert e: gelu(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b_in = nn.Parameter(torch.zeros(num_experts, d_ff))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model))
        self.pool = BufferPool()  # CPU gradient buffers reused across steps (see BufferPool)

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    def train(self, mode: bool = True):
        if not mode:
            self.pool.clear()
        return super().train(mode)

    def forward_padded(self, xb: Tensor) -> Tensor:
        """xb: [E, C, d_model] -> [E, C, d_model]; bias adds fused into the batched matmuls (baddbmm)."""
        h = gelu(torch.baddbmm(self.b_in.unsqueeze(1), xb, self.w_in))  # [E, C, d_ff]
        return torch.baddbmm(self.b_out.unsqueeze(1), h, self.w_out)  # [E, C, d_model]

    def forward_grouped(self, xs: Tensor, counts: list[int]) -> Tensor:
        """xs [M, d_model] sorted by expert (counts[e] rows for expert e) -> [M, d_model]; no padding."""
        m = xs.shape[0]
        rows = torch.arange(m, device=xs.device)
        scale = torch.ones(m, dtype=xs.dtype, device=xs.device)
        pool = self.pool if xs.device.type == "cpu" else None
        args = (self.w_in, self.b_in, self.w_out, self.b_out)
        return _GroupedMoE.apply(xs, scale, rows, rows, list(counts), pool, *args)

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
        self.expert_path: str | None = None  # None: $SMOE_LAB_MOE_PATH or the device default (see resolve_path)

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
        y = dispatch_combine(self.experts, xf, r, path=self.expert_path)  # [N, C]
        self._record(logits, r, flat_mask)
        return y.reshape(shape)

    def _record(self, logits: Tensor, r: Routing, mask: Tensor | None) -> None:
        self.aux_loss = r.aux_loss
        self.telemetry = MoETelemetry.of_call(
            logits, r.gates, r.routed_counts, r.processed_counts, r.capacity, mask, self.record_logits, r.num_real
        )


EXPERT_PATHS = ("grouped", "padded", "grouped_mm")
CUDA_DEFAULT_PATH = "padded"  # set from benchmarks/gpu.sh's measurement; SMOE_LAB_MOE_PATH overrides it


def resolve_path(path: str | None, device: torch.device) -> str:
    """The expert path to run: an explicit `path`, else $SMOE_LAB_MOE_PATH, else the device's measured default.

    "grouped"     tokens sorted by expert, one matmul pair per expert on its exact slice (`_ExpertFFN`), weight
                  gradients written in place. Reads the per-expert counts on the host (free on CPU; a sync on CUDA).
                  The CPU default: <= 1.1x the ideal stacked layer at 8-128 experts (benchmarks/bench_moe.py).
    "padded"      a static [E, capacity, d] buffer and two baddbmm: no host read at all, at the price of
                  capacity - count_e padding rows per expert. The CUDA default until gpu.sh measures otherwise.
    "grouped_mm"  tokens sorted by expert and torch._grouped_mm (one CUTLASS grouped GEMM per matmul, bf16 on
                  sm90+): no padding and no host read. Needs torch._grouped_mm; elsewhere torch runs a slow fallback.
    """
    path = path or os.environ.get("SMOE_LAB_MOE_PATH") or "auto"
    if path == "auto":
        return "grouped" if device.type == "cpu" else CUDA_DEFAULT_PATH
    if path not in EXPERT_PATHS:
        raise ValueError(
            f"unknown MoE expert path {path!r} (SMOE_LAB_MOE_PATH?); known: auto, {', '.join(EXPERT_PATHS)}"
        )
    if path == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        raise ValueError(
            f"MoE expert path 'grouped_mm' needs torch._grouped_mm (torch >= 2.8), torch is {torch.__version__}"
        )
    return path


class _GatherRows(torch.autograd.Function):
    """y = x[fwd_idx] whose backward is also a gather: grad_x = where(bwd_mask, grad_y[bwd_idx], 0).

    Exact when every x row feeds at most one y row with a non-zero gradient (bwd_idx points at that row, bwd_mask
    is False where there is none) - true for top-1 dispatch and combine. It replaces the scatter-add backward of
    index_select, the largest dispatch cost on CPU. `where`, not a product: masked rows may hold garbage (the rows
    past the last group of torch._grouped_mm are never written), and garbage * 0 can be NaN.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fwd_idx: Tensor, bwd_idx: Tensor, bwd_mask: Tensor) -> Tensor:
        ctx.save_for_backward(bwd_idx, bwd_mask)
        return x.index_select(0, fwd_idx)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        bwd_idx, bwd_mask = ctx.saved_tensors
        grad_x = torch.where(bwd_mask.unsqueeze(1), grad_y.index_select(0, bwd_idx), 0)
        return grad_x, None, None, None


def _gelu_backward(grad: Tensor, h: Tensor) -> Tensor:
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")


def _storage_refs(t: Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_ONE_HOLDER = _storage_refs(torch.empty(1))  # what _storage_refs reads for a storage that one tensor holds


class BufferPool:
    """CPU buffers an MoE layer's backward reuses from step to step: the stacked weight gradients.

    Why: with gradients set to None every step, a fresh [E, d_model, d_ff] gradient is a fresh large allocation;
    above glibc's mmap threshold (32 MB) every step maps new pages and pays a page fault per 4 KiB on first touch
    (at 128 experts, d 256 x 1024, this was most of the cost of the ideal stacked layer). A pooled buffer is reused
    only when nothing outside the pool still holds its storage (the optimizer dropped p.grad, set_to_none), so a
    gradient the caller keeps is never overwritten; otherwise a new one is allocated and pooled. Gradients are
    handed out as fresh views, so autograd's AccumulateGrad adopts them without a copy. The pool holds memory
    between steps (the size of one set of expert gradients, which the next backward needs anyway: the peak is
    unchanged); `clear()` releases it (MoELayer.eval() does). Activations and backward temporaries are not pooled:
    a pool per layer would hold each layer's temporaries at once, where autograd holds one layer's.
    """

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        b = self.buffers.get(key)
        fits = b is not None and b.shape == shape and b.dtype == like.dtype and b.device == like.device
        if not (fits and _storage_refs(b) <= _ONE_HOLDER):
            b = like.new_empty(shape)
            self.buffers[key] = b
        return b.view(shape)

    def clear(self) -> None:
        self.buffers.clear()

    def __deepcopy__(self, memo):
        return BufferPool()  # a copied layer starts with an empty pool


class _GroupedMoE(torch.autograd.Function):
    """Dispatch + grouped expert FFN + gate-scaled combine in one autograd node (the "grouped" path).

    x [N, d] tokens; scale [N] = gate for kept tokens, 0 for dropped; order [M] token of each sorted row (kept
    tokens, grouped by expert); row [N] sorted row of each token (M, a zero row, for dropped ones); counts[e] rows
    per expert (host ints). Rows of expert e get gelu(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e].

    Every matmul writes into one preallocated tensor (`out=`), so each stacked weight gradient is allocated once
    (pooled, see BufferPool) and filled slice by slice: no per-expert gradients stacked afterwards and no
    per-expert full-size zero gradients (what indexing w_in[e] costs). GELU, its backward and the bias gradients
    are one call each over all rows; dispatch and combine are single row gathers both ways.
    """

    @staticmethod
    def forward(ctx, x, scale, order, row, counts, pool, w_in, b_in, w_out, b_out):
        m, d, f = order.numel(), x.shape[1], w_in.shape[2]
        bounds = _bounds(counts)
        xs = x.index_select(0, order)  # [M, d]
        h = xs.new_empty(m, f)  # [M, d_ff] pre-activation
        for e, (s, t) in bounds:
            torch.addmm(b_in[e], xs[s:t], w_in[e], out=h[s:t])
        a = gelu(h)  # [M, d_ff]
        ys = xs.new_empty(m + 1, d)  # [M + 1, d]; the last row is the zero output of dropped tokens
        ys[m] = 0
        for e, (s, t) in bounds:
            torch.addmm(b_out[e], a[s:t], w_out[e], out=ys[s:t])
        ctx.counts, ctx.pool = counts, pool
        ctx.save_for_backward(xs, h, a, ys, scale, order, row, w_in, w_out)
        return ys.index_select(0, row).mul_(scale.to(ys.dtype).unsqueeze(1))  # [N, d]

    @staticmethod
    def backward(ctx, grad_out):
        xs, h, a, ys, scale, order, row, w_in, w_out = ctx.saved_tensors
        counts, pool = ctx.counts, ctx.pool
        need_x, need_scale = ctx.needs_input_grad[:2]
        need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[6:]
        need_gh = need_x or need_w_in or need_b_in
        m, n, num_e = order.numel(), row.numel(), len(counts)
        bounds = _bounds(counts)
        get = pool.get if pool is not None else (lambda key, shape, like: like.new_empty(shape))
        row_expert = torch.repeat_interleave(torch.tensor(counts, device=xs.device))  # [M] expert of each row
        g = grad_out.index_select(0, order)  # [M, d] in sorted order
        grad_scale = gw_in = gb_in = gw_out = gb_out = grad_x = None
        if need_scale:  # d out / d scale = the unscaled expert output of the token
            grad_scale = torch.zeros(n, dtype=scale.dtype, device=scale.device)
            grad_scale.index_copy_(0, order, torch.linalg.vecdot(g, ys[:m]).to(scale.dtype))
        g.mul_(scale.index_select(0, order).to(g.dtype).unsqueeze(1))  # grad of the sorted outputs
        gw_out = get("w_out", tuple(w_out.shape), w_out) if need_w_out else None
        ga = torch.empty_like(a) if need_gh else None  # [M, d_ff]
        for e, (s, t) in bounds:
            if need_w_out:
                torch.mm(a[s:t].T, g[s:t], out=gw_out[e])
            if need_gh:
                torch.mm(g[s:t], w_out[e].T, out=ga[s:t])
        if need_b_out:
            gb_out = g.new_zeros(num_e, g.shape[1]).index_add_(0, row_expert, g)
        if need_gh:
            gh = _gelu_backward(ga, h)  # [M, d_ff]
            gw_in = get("w_in", tuple(w_in.shape), w_in) if need_w_in else None
            gxs = xs.new_empty(m + 1, xs.shape[1]) if need_x else None  # [M + 1, d]; row M: dropped tokens' zero
            for e, (s, t) in bounds:
                if need_w_in:
                    torch.mm(xs[s:t].T, gh[s:t], out=gw_in[e])
                if need_x:
                    torch.mm(gh[s:t], w_in[e].T, out=gxs[s:t])
            if need_b_in:
                gb_in = gh.new_zeros(num_e, gh.shape[1]).index_add_(0, row_expert, gh)
            if need_x:
                gxs[m] = 0
                grad_x = gxs.index_select(0, row)
        empty = [e for e, c in enumerate(counts) if c == 0]
        for gw in (gw_in, gw_out):
            if gw is not None and empty:  # an expert without tokens gets a zero gradient
                gw[empty] = 0
        return grad_x, grad_scale, None, None, None, None, gw_in, gb_in, gw_out, gb_out


def _bounds(counts: list[int]) -> list[tuple[int, tuple[int, int]]]:
    """(expert, (start, end)) of each non-empty expert's rows."""
    out, s = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, (s, s + c)))
        s += c
    return out


@dataclass
class DispatchPlan:
    """Where each kept token goes in the padded [E, C, d] expert buffer (see `dispatch`)."""

    slot: Tensor  # [N] buffer slot of each token (0 for dropped tokens, whose output is masked out)
    src: Tensor  # [E*C] token feeding each slot (0 for unused slots, whose outputs are never read)
    filled: Tensor  # [E*C] bool: slot holds a kept token
    capacity: int  # C


def plan_dispatch(r: Routing, num_experts: int) -> DispatchPlan | None:
    """Slots in a static buffer of C = r.capacity rows per expert; None if the buffer would be empty.

    Built by scatters only (no boolean indexing, no nonzero, no count read back): sync-free on CUDA. Dropped
    tokens scatter into one extra dump slot that is cut off.
    """
    c = r.capacity
    if c == 0 or r.kept.numel() == 0:
        return None
    n, size, dev = r.kept.numel(), num_experts * c, r.kept.device
    slot_or_dump = torch.where(r.kept, r.expert_index * c + r.position, size)  # [N]
    src = torch.zeros(size + 1, dtype=torch.long, device=dev).scatter_(0, slot_or_dump, torch.arange(n, device=dev))
    filled = torch.zeros(size + 1, dtype=torch.bool, device=dev).scatter_(0, slot_or_dump, r.kept)
    slot = torch.where(r.kept, slot_or_dump, 0)  # [N]
    return DispatchPlan(slot, src[:size], filled[:size], c)


def dispatch(x: Tensor, r: Routing, plan: DispatchPlan) -> Tensor:
    """x [N, d] -> expert buffer [E, C, d] (a row gather both ways, see _GatherRows)."""
    e = plan.src.numel() // plan.capacity
    return _GatherRows.apply(x, plan.src, plan.slot, r.kept).view(e, plan.capacity, x.shape[1])


def combine(yb: Tensor, r: Routing, plan: DispatchPlan) -> Tensor:
    """Expert outputs [E, C, d] -> [N, d], each kept token scaled by its gate, dropped tokens 0."""
    y = _GatherRows.apply(yb.reshape(-1, yb.shape[-1]), plan.slot, plan.src, plan.filled)  # [N, d]
    return _gate(y, r)


def _gate(y: Tensor, r: Routing) -> Tensor:
    """y [N, d] rows of kept tokens scaled by their gate; dropped tokens exactly 0 (whatever their row held)."""
    return torch.where(r.kept.unsqueeze(1), y, 0) * r.gate.to(y.dtype).unsqueeze(1)


@dataclass
class GroupPlan:
    """Tokens sorted by expert (kept first, token order within an expert), for the unpadded paths."""

    order: Tensor  # [N] token of each sorted row (kept rows first; rows >= the kept total are dropped tokens)
    inverse: Tensor  # [N] sorted row of each token
    counts: Tensor  # [E] long: kept rows per expert
    row_kept: Tensor  # [N] bool: sorted row holds a kept token


def plan_groups(r: Routing, num_experts: int) -> GroupPlan:
    """A stable sort by (kept expert | dropped last): sync-free (no row count is read back)."""
    key = torch.where(r.kept, r.expert_index, num_experts)  # [N]; dropped and padding sort last
    order = torch.sort(key, stable=True).indices  # [N]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return GroupPlan(order, inverse, count_per_expert(r.expert_index, num_experts, r.kept), r.kept[order])


def _grouped(experts: Experts, x: Tensor, r: Routing) -> Tensor:
    """The "grouped" path: kept rows only, one addmm pair per expert (host-side counts), see _GroupedMoE."""
    gp = plan_groups(r, experts.num_experts)
    counts = gp.counts.tolist()  # the host read of this path
    m = sum(counts)
    if m == 0:
        return x.new_zeros(x.shape)
    row = torch.where(r.kept, gp.inverse, m)  # [N]; dropped tokens read the zero row M
    scale = r.gate * r.kept  # [N]
    pool = experts.pool if x.device.type == "cpu" else None
    p = experts
    return _GroupedMoE.apply(x, scale, gp.order[:m], row, counts, pool, p.w_in, p.b_in, p.w_out, p.b_out)


def _grouped_mm(experts: Experts, x: Tensor, r: Routing) -> Tensor:
    """The "grouped_mm" path: all N rows sorted by expert, kept rows first; torch._grouped_mm over the kept groups.

    Rows past the last group (dropped tokens) are never written by the grouped GEMM and are masked out by `where`
    in both directions. bf16 under autocast (the CUTLASS kernel is bf16-only); otherwise the parameters' dtype.
    """
    gp = plan_groups(r, experts.num_experts)
    offs = torch.cumsum(gp.counts, 0).to(torch.int32)  # [E] end row of each expert's group
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    p = experts
    with torch.autocast(x.device.type, enabled=False):
        xs = _GatherRows.apply(x.to(dt), gp.order, gp.inverse, r.kept)  # [N, d]
        row_expert = torch.where(gp.row_kept, r.expert_index[gp.order], 0)  # [N]
        h = torch._grouped_mm(xs, p.w_in.to(dt), offs=offs) + p.b_in.to(dt).index_select(0, row_expert)
        h = torch.where(gp.row_kept.unsqueeze(1), h, 0)  # rows past the last group hold garbage
        ys = torch._grouped_mm(gelu(h), p.w_out.to(dt), offs=offs) + p.b_out.to(dt).index_select(0, row_expert)
        y = _GatherRows.apply(ys, gp.inverse, gp.order, gp.row_kept)  # [N, d]
    return _gate(y, r)


def _padded(experts: Experts, x: Tensor, r: Routing) -> Tensor:
    plan = plan_dispatch(r, experts.num_experts)
    if plan is None:
        return x.new_zeros(x.shape)
    return combine(experts.forward_padded(dispatch(x, r, plan)), r, plan)


def dispatch_combine(
    experts: Experts, x: Tensor, r: Routing, grouped: bool | None = None, path: str | None = None
) -> Tensor:
    """Run each kept token through its expert, scale by its gate; dropped tokens get zeros. x [N, d] -> [N, d].

    path: "grouped", "padded" or "grouped_mm" (see `resolve_path`); None: $SMOE_LAB_MOE_PATH or the device's
    default. `grouped=True/False` is the older spelling of path="grouped"/"padded". Every path dispatches and
    combines by row gathers in both directions (_GatherRows); no [tokens, experts, capacity] tensor exists.
    """
    if grouped is not None:
        path = "grouped" if grouped else "padded"
    path = resolve_path(path, x.device)
    return {"grouped": _grouped, "padded": _padded, "grouped_mm": _grouped_mm}[path](experts, x, r)


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
