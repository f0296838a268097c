"""The stacked experts (`Experts`: w_in [E, d_model, d_ff], b_in, w_out, b_out) and the expert paths that run each
kept token through its expert (`dispatch_combine`, `resolve_path`): "grouped", "padded" and "grouped_mm", all
dispatching and combining by row gathers in both directions. Used by smoe_lab.moe.MoELayer; everything here is
re-exported there. See smoe_lab/moe.py's docstring for the paths' host syncs.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .moe_routing import Routing, count_per_expert


def gelu(x: Tensor, out: Tensor | None = None) -> Tensor:
    """GPT-2's GELU (tanh approximation); `out`: written into that tensor (no autograd)."""
    if out is not None:
        return torch._C._nn.gelu(x, approximate="tanh", out=out)
    return F.gelu(x, approximate="tanh")


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
            scratch_pool().clear()
        return super().train(mode)

    def forward_padded(self, xb: Tensor) -> Tensor:
        """xb: [E, C, d_model] -> [E, C, d_model]; bias adds fused into the batched matmuls (baddbmm)."""
        h = gelu(torch.baddbmm(self.b_in.unsqueeze(1), xb, self.w_in))  # [E, C, d_ff]
        return torch.baddbmm(self.b_out.unsqueeze(1), h, self.w_out)  # [E, C, d_model]

    def pool_for(self, x: Tensor, scale: Tensor) -> BufferPool | None:
        """Where the grouped path's buffers live for a call on x with gate `scale`: None on CUDA (its caching
        allocator reuses memory already); on CPU this layer's pool when the call builds a graph (it keeps the
        activations until the backward), else the thread's scratch pool (they die with the call)."""
        if x.device.type != "cpu":
            return None
        graph = torch.is_grad_enabled() and any(t.requires_grad for t in (x, scale, *self.parameters()))
        return self.pool if graph else scratch_pool()

    def forward_one(self, e: int, x: Tensor) -> Tensor:
        """Expert e on x [n, d_model] (reference path)."""
        return gelu(x @ self.w_in[e] + self.b_in[e]) @ self.w_out[e] + self.b_out[e]


EXPERT_PATHS = ("grouped", "padded", "grouped_mm")
CUDA_DEFAULT_PATH = "padded"  # set from benchmarks/gpu.sh's measurement; SMOE_LAB_MOE_PATH overrides it


def resolve_path(path: str | None, device: torch.device) -> str:
    """The expert path to run: an explicit `path`, else $SMOE_LAB_MOE_PATH, else the device's measured default.

    "grouped"     tokens grouped by expert, one matmul pair per expert on its exact slice (`_GroupedMoE`); weight
                  gradients, saved activations and backward temporaries written into pooled buffers. Reads the
                  per-expert counts on the host (free on CPU; a sync on CUDA). The CPU default
                  (benchmarks/bench_moe.py: below the ideal stacked layer from 32 experts or 16384 tokens on).
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


def _gelu_backward(grad: Tensor, h: Tensor, out: Tensor) -> Tensor:
    """d gelu(h) / d h times grad, written into `out` (may be `grad` itself: elementwise, in place)."""
    return torch.ops.aten.gelu_backward.grad_input(grad, h, approximate="tanh", grad_input=out)


def _storage_refs(t: Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_ONE_HOLDER = _storage_refs(torch.empty(1))  # what _storage_refs reads for a storage that one tensor holds


class BufferPool:
    """CPU buffers that an MoE layer reuses from step to step instead of allocating them afresh.

    Why: a fresh tensor above glibc's mmap threshold (32 MB at most) maps new pages and pays a page fault per 4 KiB
    on first touch, and glibc trims freed heap memory back to the OS, so even smaller ones fault again. At 128
    experts (d 256 x 1024) a fresh stacked weight gradient was most of the cost of the ideal stacked layer; at 16384
    tokens the [tokens, d_ff] activations (64 MB each) fault on every step. Two kinds of pool hold them:

    - each layer's own pool (`Experts.pool`): its stacked weight gradients and the activations its backward needs
      (kept from forward to backward, one set per layer, as autograd holds them anyway);
    - one scratch pool per thread (`scratch_pool()`): backward temporaries and no-grad forward buffers, which are
      dead once the call returns, so every layer shares one set (autograd runs one layer's backward at a time).

    A buffer is reused only when nothing outside the pool still holds its storage (the optimizer dropped p.grad,
    the graph that saved an activation was freed), so a tensor the caller keeps is never overwritten; otherwise a
    new one is allocated and pooled. A request may take the front of a larger buffer (the kept-token count changes
    every step). Tensors are handed out as fresh views, so autograd's AccumulateGrad adopts a gradient without a
    copy. The pools hold memory between steps (what the next step needs anyway: the peak of a step is unchanged);
    MoELayer.eval() releases its layer's pool and the thread's scratch pool (one layer's no-grad buffers stay held
    after an evaluation until the next eval()).
    """

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of `shape` (dtype and device of `like`) from the front of buffer `key`."""
        need = math.prod(shape)
        b = self.buffers.get(key)
        fits = b is not None and b.numel() >= need and b.dtype == like.dtype and b.device == like.device
        if not (fits and _storage_refs(b) <= _ONE_HOLDER):
            b = like.new_empty(need)
            self.buffers[key] = b
        return b[:need].view(shape)

    def clear(self) -> None:
        self.buffers.clear()

    def __deepcopy__(self, memo):
        return BufferPool()  # a copied layer starts with an empty pool


_SCRATCH = threading.local()


def scratch_pool() -> BufferPool:
    """This thread's pool of buffers that die when a call returns (see BufferPool)."""
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = BufferPool()
    return pool


def _new(key: str, shape: tuple[int, ...], like: Tensor, pool: BufferPool | None) -> Tensor:
    return pool.get(key, shape, like) if pool is not None else like.new_empty(shape)


class _GroupedMoE(torch.autograd.Function):
    """Dispatch + grouped expert FFN + gate-scaled combine in one autograd node (the "grouped" path).

    x [N, d] tokens; scale [N] = gate for kept tokens, 0 for dropped; src [M] token of each slot (kept tokens
    grouped by expert, token order within an expert); row [N] slot of each token (M, a zero row, for dropped
    ones); counts[e] slots of expert e (host ints). Slots of expert e get gelu(x @ w_in[e] + b_in[e]) @ w_out[e] +
    b_out[e]: one matmul per expert and layer (torch.addmm / mm on the group's slice, written in place with out=).

    Every large tensor is written into a pooled buffer (see BufferPool): the stacked weight gradients and the saved
    activations in the layer's pool, backward temporaries in the thread's scratch pool; `pool` None (CUDA)
    allocates them. No per-expert gradients are stacked afterwards and no per-expert full-size zero gradients exist
    (what indexing w_in[e] costs). GELU, its backward (in place) and the bias gradients are one call each over all
    slots; dispatch and combine are single row gathers both ways. Tried and dropped (benchmarks/bench_moe.py, 2
    cores): padding every group to the largest for one bmm per matmul (1.1-1.3x slower: routers leave ~20% padding),
    and spreading the experts over single-threaded worker threads (no steady gain below 128 experts).
    """

    @staticmethod
    def forward(ctx, x, scale, src, row, counts, pool, w_in, b_in, w_out, b_out):
        m, d, f = src.numel(), x.shape[1], w_in.shape[2]
        live = [e for e, c in enumerate(counts) if c]  # experts with tokens
        xs = torch.index_select(x, 0, src, out=_new("xs", (m, d), x, pool))  # [M, d]
        h = _new("h", (m, f), x, pool)  # [M, d_ff] pre-activation
        _per_expert(torch.addmm, live, b_in.unbind(0), xs.split(counts), w_in.unbind(0), h.split(counts))
        a = gelu(h, out=_new("a", (m, f), x, pool))  # [M, d_ff]
        ys = _new("ys", (m + 1, d), x, pool)  # [M + 1, d]; the last row is the zero output of dropped tokens
        ys[m] = 0
        _per_expert(torch.addmm, live, b_out.unbind(0), a.split(counts), w_out.unbind(0), ys[:m].split(counts))
        ctx.counts, ctx.live, ctx.pool = counts, live, pool
        ctx.save_for_backward(xs, h, a, ys, scale, src, row, w_in, w_out)
        return ys.index_select(0, row).mul_(scale.to(ys.dtype).unsqueeze(1))  # [N, d]

    @staticmethod
    def backward(ctx, grad_out):
        xs, h, a, ys, scale, src, row, w_in, w_out = ctx.saved_tensors
        counts, live, pool = ctx.counts, ctx.live, ctx.pool
        tmp = scratch_pool() if pool is not None else None
        need_x, need_scale = ctx.needs_input_grad[:2]
        need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[6:]
        need_gh = need_x or need_w_in or need_b_in
        m, n, d, f, num_e = src.numel(), row.numel(), xs.shape[1], h.shape[1], len(counts)
        grad_scale = gw_in = gb_in = gw_out = gb_out = grad_x = None
        g = torch.index_select(grad_out, 0, src, out=_new("g", (m, d), xs, tmp))  # [M, d] in slot order
        if need_scale:  # d out / d scale = the unscaled expert output of the token (0 for dropped tokens)
            grad_scale = torch.zeros(n, dtype=scale.dtype, device=scale.device)
            grad_scale.index_copy_(0, src, torch.linalg.vecdot(g, ys[:m]).to(scale.dtype))
        g.mul_(scale.index_select(0, src).to(g.dtype).unsqueeze(1))  # grad of the slot outputs
        g_e = g.split(counts)
        if need_w_out:
            gw_out = _new("w_out", tuple(w_out.shape), w_out, pool)
            _per_expert(torch.mm, live, None, a.T.split(counts, 1), g_e, gw_out.unbind(0))
        if need_gh:
            ga = _new("ga", (m, f), a, tmp)  # [M, d_ff]
            _per_expert(torch.mm, live, None, g_e, w_out.transpose(1, 2).unbind(0), ga.split(counts))
        slot_expert = None
        if need_b_in or need_b_out:
            slot_expert = torch.repeat_interleave(torch.tensor(counts, device=xs.device))  # [M]
        if need_b_out:
            gb_out = g.new_zeros(num_e, d).index_add_(0, slot_expert, g)
        if need_gh:
            gh = _gelu_backward(ga, h, out=ga)  # [M, d_ff], in place
            gh_e = gh.split(counts)
            if need_w_in:
                gw_in = _new("w_in", tuple(w_in.shape), w_in, pool)
                _per_expert(torch.mm, live, None, xs.T.split(counts, 1), gh_e, gw_in.unbind(0))
            if need_b_in:
                gb_in = gh.new_zeros(num_e, f).index_add_(0, slot_expert, gh)
            if need_x:
                gxs = _new("gxs", (m + 1, d), xs, tmp)  # [M + 1, d]; row M: the dropped tokens' zero
                _per_expert(torch.mm, live, None, gh_e, w_in.transpose(1, 2).unbind(0), gxs[:m].split(counts))
                gxs[m] = 0
                grad_x = gxs.index_select(0, row)
        empty = [e for e, c in enumerate(counts) if c == 0]
        for gw in (gw_in, gw_out):
            if gw is not None and empty:  # an expert without tokens gets a zero gradient
                gw[empty] = 0
        return grad_x, grad_scale, None, None, None, None, gw_in, gb_in, gw_out, gb_out


def _per_expert(op, live: list[int], bias, lhs, rhs, out) -> None:
    """out[e] = op(bias[e], lhs[e], rhs[e]) (addmm) or op(lhs[e], rhs[e]) (mm, bias None) for every expert in
    `live`, written in place; the per-expert views come from one split / unbind call each (cheaper than slicing)."""
    if bias is None:
        for e in live:
            op(lhs[e], rhs[e], out=out[e])
    else:
        for e in live:
            op(bias[e], lhs[e], rhs[e], out=out[e])


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


def group_layout(r: Routing, num_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    """Expert slots of the kept tokens for the "grouped" path: (src [M], row [N], counts); see _GroupedMoE.

    counts[e]: kept tokens of expert e (read on the host: free on CPU). A kept token's slot is its expert's first
    slot + its position in the expert's queue (Routing.position), so no sort is needed; dropped tokens get row M
    (the zero row).
    """
    counts_t = r.processed_counts  # [E]
    counts = counts_t.tolist()  # the host read of this path
    m, n = sum(counts), r.kept.numel()
    first = torch.cumsum(counts_t, 0) - counts_t  # [E]
    row = torch.where(r.kept, first[r.expert_index] + r.position, m)  # [N]
    src = torch.zeros(m + 1, dtype=torch.long, device=row.device).scatter_(0, row, torch.arange(n, device=row.device))
    return src[:m], row, counts  # the dump slot M (dropped tokens) is cut off


def _grouped(experts: Experts, x: Tensor, r: Routing) -> Tensor:
    """The "grouped" path: kept rows only, one addmm pair per expert (host-side counts), see _GroupedMoE."""
    src, row, counts = group_layout(r, experts.num_experts)
    if sum(counts) == 0:
        return x.new_zeros(x.shape)
    scale = r.gate * r.kept  # [N]
    p = experts
    return _GroupedMoE.apply(x, scale, src, row, counts, p.pool_for(x, scale), p.w_in, p.b_in, p.w_out, p.b_out)


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
