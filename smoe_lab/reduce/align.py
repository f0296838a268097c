"""Permutation alignment of experts before merging (UNCURL Algorithm 1, line 13: PermutationAlign).

An expert is a two-layer MLP, gelu(x @ w_in + b_in) @ w_out + b_out (GELU tanh approximation, as GPT-2). Its
hidden units can be reordered without changing the function. To merge expert E_i into the reference E_J we find
the reordering P that maximises

    <W_in^(i) P, W_in^(J)>_F + <b_in^(i) P, b_in^(J)> + <P^T W_out^(i), W_out^(J)>_F

(weight matching, Ainsworth et al.; the paper's objective with biases included), a linear assignment problem
solved exactly by scipy.optimize.linear_sum_assignment. Maximising the inner products is the same as minimising
the squared l2 distance between the permuted expert and the reference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ..expert_weights import BiasFreeExpertWeights, ExpertWeights, GatedExpertWeights  # noqa: F401  (re-exported)


def check_expert(e: ExpertWeights, name: str = "expert") -> tuple[int, int]:
    """(d_model, d_ff) of a well-formed expert; ValueError naming the first inconsistent field."""
    if not isinstance(e, tuple) or len(e) != 4 or not all(isinstance(t, torch.Tensor) for t in e):
        raise ValueError(f"{name} must be ExpertWeights(w_in, b_in, w_out, b_out) of tensors")
    e = ExpertWeights(*e)
    if e.w_in.ndim != 2:
        raise ValueError(f"{name}.w_in must be [d_model, d_ff], got shape {tuple(e.w_in.shape)}")
    d_model, d_ff = e.w_in.shape
    expected = {"b_in": (d_ff,), "w_out": (d_ff, d_model), "b_out": (d_model,)}
    for field, shape in expected.items():
        if tuple(getattr(e, field).shape) != shape:
            raise ValueError(f"{name}.{field} must have shape {shape}, got {tuple(getattr(e, field).shape)}")
    return d_model, d_ff


def expert_forward(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """gelu(x @ w_in + b_in) @ w_out + b_out for x [..., d_model] -> [..., d_model]."""
    return F.gelu(x @ e.w_in + e.b_in, approximate="tanh") @ e.w_out + e.b_out


def permute_expert(e: ExpertWeights, perm: torch.Tensor) -> ExpertWeights:
    """Reorder hidden units: unit b of the result is unit perm[b] of e. The expert's function is unchanged.

    Also takes GatedExpertWeights and BiasFreeExpertWeights (permute_gated_expert, permute_bias_free_expert).
    """
    if isinstance(e, GatedExpertWeights):
        return permute_gated_expert(e, perm)
    if isinstance(e, BiasFreeExpertWeights):
        return permute_bias_free_expert(e, perm)
    return ExpertWeights(e.w_in[:, perm], e.b_in[perm], e.w_out[perm, :], e.b_out)


def alignment_cost(expert: ExpertWeights, reference: ExpertWeights) -> torch.Tensor:
    """C [d_ff, d_ff] float64: how well the expert's hidden unit a matches the reference's unit b.

    C[a, b] = <w_in[:, a], ref.w_in[:, b]> + b_in[a] * ref.b_in[b] + <w_out[a, :], ref.w_out[b, :]>, as two matmuls
    (the input bias is appended to w_in as one more row).
    """
    shape = check_expert(expert, "expert")
    if check_expert(reference, "reference") != shape:
        raise ValueError(
            f"expert and reference differ in shape: (d_model, d_ff) = {shape} vs {check_expert(reference)}"
        )
    w = torch.cat([expert.w_in, expert.b_in[None, :]]).to(torch.float64)  # [d_model + 1, d_ff]
    w_ref = torch.cat([reference.w_in, reference.b_in[None, :]]).to(torch.float64)  # [d_model + 1, d_ff]
    return w.T @ w_ref + expert.w_out.to(torch.float64) @ reference.w_out.to(torch.float64).T  # [d_ff, d_ff]


def _best_assignment(C: torch.Tensor) -> torch.Tensor:
    """perm [d_ff] maximising sum_b C[perm[b], b] (the float64 optimum).

    Solver: LAPJV (the `lapjv` package, AVX2, float32) when it is installed, else scipy's linear_sum_assignment.
    LAPJV solves in float32, so its answer is checked in float64 with its own dual certificate: its duals (u, v),
    shifted by their largest float64 infeasibility, bound every assignment's cost from below, and the assignment
    is kept only if its float64 cost is within float32 resolution of that bound (4 n 2^-23 max|C|: optimal up to
    float32 rounding of the costs); otherwise scipy solves it exactly in float64. On random and alignment costs of
    256-4096 units both give the identical objective; at 4096 x 4096 LAPJV was 1.25x faster on alignment costs and
    2.7x on uniform ones (`python benchmarks/bench_assignment.py`, shared machine).
    """
    C = C.cpu().numpy()  # [d_ff, d_ff]
    if not np.isfinite(C).all():
        raise ValueError("expert or reference weights contain NaN or Inf")
    n = C.shape[0]
    try:
        import lapjv  # optional fast path (wheels for CPython 3.10/3.11 on Linux x86_64)
    except ImportError:
        lapjv = None
    if lapjv is not None and n > 1:
        cost = -C  # [d_ff, d_ff] float64, minimised
        _, row_of_col, (_, u, v) = lapjv.lapjv(np.ascontiguousarray(cost, dtype=np.float32))
        perm = row_of_col.astype(np.int64)  # [d_ff]: expert unit matched to reference unit b
        u, v = u.astype(np.float64), v.astype(np.float64)
        infeasible = 0.0  # max_ij u_i + v_j - cost_ij, in row blocks (no second n x n array)
        for i in range(0, n, 512):
            infeasible = max(infeasible, float((u[i : i + 512, None] + v[None, :] - cost[i : i + 512]).max()))
        gap = cost[perm, np.arange(n)].sum() - (u.sum() + v.sum() - n * infeasible)  # >= primal - optimum
        if np.array_equal(np.sort(perm), np.arange(n)) and gap <= 4 * n * 2.0**-23 * np.abs(cost).max():
            return torch.from_numpy(perm)
    rows, cols = linear_sum_assignment(C, maximize=True)  # expert unit rows[k] <-> reference unit cols[k]
    perm = np.empty_like(rows)
    perm[cols] = rows  # [d_ff]
    return torch.from_numpy(perm).long()


def align_expert(expert: ExpertWeights, reference: ExpertWeights) -> torch.Tensor:
    """perm LongTensor [d_ff] with `permute_expert(expert, perm)` the best match to `reference`.

    Maximises sum_b C[perm[b], b]: hidden unit b of the permuted expert is the expert's unit perm[b], matched to the
    reference's unit b. A reference aligned to itself gives the identity (up to exactly tied units).
    Also takes the Hugging Face expert layouts (GatedExpertWeights, BiasFreeExpertWeights; see below).
    """
    return _best_assignment(expert_alignment_cost(expert, reference))


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's (process-wide) intra-op thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def align_experts(experts: Sequence[ExpertWeights], reference: ExpertWeights, workers: int = 1) -> list[torch.Tensor]:
    """`align_expert(e, reference)` for each expert, in order; `workers` > 1 aligns experts on a thread pool."""
    return align_pairs([(e, reference) for e in experts], workers=workers)


def align_pairs(pairs: Sequence[tuple[ExpertWeights, ExpertWeights]], workers: int = 1) -> list[torch.Tensor]:
    """`align_expert(expert, reference)` for each (expert, reference) pair, in order, on `workers` threads.

    One pool over every pair of a layer (all clusters at once) keeps the workers busy even when each cluster holds
    only two or three experts. Threads suffice because torch matmuls and scipy's assignment solver both release the
    GIL. So that `workers` concurrent matmuls do not oversubscribe the cores, torch's process-wide thread count is
    lowered to max(1, threads // workers) for the duration of the call and restored afterwards. Measured on 2 shared
    cores, workers=2 vs 1: 1.9x at d_ff=1024 (8 experts), 1.3-1.4x at d_ff=4096 (4 experts); without the thread cap
    threads were slower than serial, and a spawn-process pool gained nothing at 4096 and lost at 1024.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(pairs) < 2:
        return [align_expert(e, ref) for e, ref in pairs]
    workers = min(workers, len(pairs))
    with _torch_threads(max(1, torch.get_num_threads() // workers)), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda pair: align_expert(*pair), pairs))


# -- Hugging Face expert layouts (smoe_lab.hf): SwiGLU experts of the fused decoders, T5's bias-free ReLU experts ------
def check_gated_expert(e: GatedExpertWeights, name: str = "expert") -> tuple[int, int]:
    """(d_model, d_ff) of a well-formed SwiGLU expert; ValueError naming the first inconsistent field."""
    if e.w_gate.ndim != 2:
        raise ValueError(f"{name}.w_gate must be [d_ff, d_model], got shape {tuple(e.w_gate.shape)}")
    d_ff, d_model = e.w_gate.shape
    for field, shape in {"w_up": (d_ff, d_model), "w_down": (d_model, d_ff)}.items():
        if tuple(getattr(e, field).shape) != shape:
            raise ValueError(f"{name}.{field} must have shape {shape}, got {tuple(getattr(e, field).shape)}")
    return d_model, d_ff


def check_bias_free_expert(e: BiasFreeExpertWeights, name: str = "expert") -> tuple[int, int]:
    """(d_model, d_ff) of a well-formed bias-free expert; ValueError naming the inconsistent field."""
    if e.wi.ndim != 2:
        raise ValueError(f"{name}.wi must be [d_ff, d_model], got shape {tuple(e.wi.shape)}")
    d_ff, d_model = e.wi.shape
    if tuple(e.wo.shape) != (d_model, d_ff):
        raise ValueError(f"{name}.wo must have shape {(d_model, d_ff)}, got {tuple(e.wo.shape)}")
    return d_model, d_ff


def _same_shape(check, expert, reference) -> None:
    a, b = check(expert, "expert"), check(reference, "reference")
    if a != b:
        raise ValueError(f"expert and reference differ in shape: (d_model, d_ff) = {a} vs {b}")


def gated_alignment_cost(expert: GatedExpertWeights, reference: GatedExpertWeights) -> torch.Tensor:
    """C [d_ff, d_ff] float64 over all three matrices: C[a, b] = <gate_a, ref.gate_b> + <up_a, ref.up_b>
    + <down[:, a], ref.down[:, b]>. Gate and up rows move together with the down column (one hidden unit)."""
    _same_shape(check_gated_expert, expert, reference)
    e, r = (GatedExpertWeights(*(t.to(torch.float64) for t in x)) for x in (expert, reference))
    return e.w_gate @ r.w_gate.T + e.w_up @ r.w_up.T + e.w_down.T @ r.w_down  # [d_ff, d_ff]


def bias_free_alignment_cost(expert: BiasFreeExpertWeights, reference: BiasFreeExpertWeights) -> torch.Tensor:
    """C [d_ff, d_ff] float64: C[a, b] = <wi_a, ref.wi_b> + <wo[:, a], ref.wo[:, b]>."""
    _same_shape(check_bias_free_expert, expert, reference)
    e, r = (BiasFreeExpertWeights(*(t.to(torch.float64) for t in x)) for x in (expert, reference))
    return e.wi @ r.wi.T + e.wo.T @ r.wo  # [d_ff, d_ff]


def expert_alignment_cost(expert, reference) -> torch.Tensor:
    """The alignment cost for the experts' layout (ExpertWeights, GatedExpertWeights or BiasFreeExpertWeights)."""
    for kind, cost in ((GatedExpertWeights, gated_alignment_cost), (BiasFreeExpertWeights, bias_free_alignment_cost)):
        if isinstance(expert, kind) or isinstance(reference, kind):
            if not (isinstance(expert, kind) and isinstance(reference, kind)):
                got = f"{type(expert).__name__} and {type(reference).__name__}"
                raise ValueError(f"expert and reference must both be {kind.__name__}, got {got}")
            return cost(expert, reference)
    return alignment_cost(expert, reference)


def permute_gated_expert(e: GatedExpertWeights, perm: torch.Tensor) -> GatedExpertWeights:
    """Hidden unit b of the result is unit perm[b] of e: gate and up rows and the down column move together."""
    return GatedExpertWeights(e.w_gate[perm], e.w_up[perm], e.w_down[:, perm])


def permute_bias_free_expert(e: BiasFreeExpertWeights, perm: torch.Tensor) -> BiasFreeExpertWeights:
    return BiasFreeExpertWeights(e.wi[perm], e.wo[:, perm])


def gated_expert_forward(e: GatedExpertWeights, x: torch.Tensor, act=F.silu) -> torch.Tensor:
    """down(act(x W_gate^T) * (x W_up^T)) for x [..., d_model] -> [..., d_model] (SiLU: SwiGLU)."""
    return (act(x @ e.w_gate.T) * (x @ e.w_up.T)) @ e.w_down.T


def bias_free_expert_forward(e: BiasFreeExpertWeights, x: torch.Tensor, act=F.relu) -> torch.Tensor:
    """wo(act(wi x)) for x [..., d_model] -> [..., d_model] (ReLU: T5 / Switch Transformers)."""
    return act(x @ e.wi.T) @ e.wo.T
