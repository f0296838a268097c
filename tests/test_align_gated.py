"""Alignment and merging of the Hugging Face expert layouts: SwiGLU (gate, up, down) and T5's bias-free (wi, wo)."""

import pytest
import torch
import torch.nn.functional as F

from smoe_lab.reduce import (
    BiasFreeExpertWeights,
    ExpertWeights,
    GatedExpertWeights,
    align_expert,
    bias_free_alignment_cost,
    bias_free_expert_forward,
    expert_alignment_cost,
    gated_alignment_cost,
    gated_expert_forward,
    merge_experts,
    permute_expert,
)
from smoe_lab.reduce.methods import merge_groups, plan_freq_merge

D_MODEL, D_FF = 6, 10


def gated(seed):
    g = torch.Generator().manual_seed(seed)
    return GatedExpertWeights(
        *(torch.randn(s, generator=g) for s in ((D_FF, D_MODEL), (D_FF, D_MODEL), (D_MODEL, D_FF)))
    )


def bias_free(seed):
    g = torch.Generator().manual_seed(seed)
    return BiasFreeExpertWeights(torch.randn(D_FF, D_MODEL, generator=g), torch.randn(D_MODEL, D_FF, generator=g))


LAYOUTS = [(gated, gated_expert_forward), (bias_free, bias_free_expert_forward)]


@pytest.mark.parametrize("make,forward", LAYOUTS, ids=["swiglu", "t5"])
def test_permuting_keeps_the_function(make, forward):
    e = make(0)
    x = torch.randn(7, D_MODEL)
    p = permute_expert(e, torch.randperm(D_FF, generator=torch.Generator().manual_seed(1)))
    assert type(p) is type(e) and not torch.equal(p[0], e[0])
    torch.testing.assert_close(forward(p, x), forward(e, x), rtol=1e-5, atol=1e-5)


def test_forwards_are_swiglu_and_relu():
    e, x = gated(2), torch.randn(3, D_MODEL)
    want = (F.silu(x @ e.w_gate.T) * (x @ e.w_up.T)) @ e.w_down.T
    torch.testing.assert_close(gated_expert_forward(e, x), want)
    b = bias_free(3)
    torch.testing.assert_close(bias_free_expert_forward(b, x), torch.relu(x @ b.wi.T) @ b.wo.T)


def test_costs_are_inner_products_over_every_matrix():
    e, r = gated(4), gated(5)
    C = gated_alignment_cost(e, r)
    a, b = 3, 7
    want = e.w_gate[a] @ r.w_gate[b] + e.w_up[a] @ r.w_up[b] + e.w_down[:, a] @ r.w_down[:, b]
    assert C.dtype == torch.float64 and C.shape == (D_FF, D_FF)
    assert abs(float(C[a, b]) - float(want)) < 1e-5
    e, r = bias_free(4), bias_free(5)
    C = bias_free_alignment_cost(e, r)
    assert abs(float(C[a, b]) - float(e.wi[a] @ r.wi[b] + e.wo[:, a] @ r.wo[:, b])) < 1e-5


@pytest.mark.parametrize("make,forward", LAYOUTS, ids=["swiglu", "t5"])
def test_a_planted_permutation_is_recovered(make, forward):
    ref = make(6)
    perm = torch.randperm(D_FF, generator=torch.Generator().manual_seed(7))
    noisy = type(ref)(*(t + 1e-3 * torch.randn(t.shape) for t in permute_expert(ref, perm)))
    found = align_expert(noisy, ref)
    aligned = permute_expert(noisy, found)
    assert all(torch.allclose(a, b, atol=1e-2) for a, b in zip(aligned, ref))
    assert torch.equal(align_expert(ref, ref), torch.arange(D_FF))


def test_gate_and_up_rows_move_together_with_the_down_column():
    """A permutation that matches gate rows alone but not up rows loses to the joint one."""
    ref = gated(8)
    perm = torch.randperm(D_FF, generator=torch.Generator().manual_seed(9))
    moved = permute_expert(ref, perm)
    p = align_expert(moved, ref)
    torch.testing.assert_close(moved.w_up[p], ref.w_up)
    torch.testing.assert_close(moved.w_down[:, p], ref.w_down)


def test_mixed_layouts_are_a_clear_error():
    with pytest.raises(ValueError, match="both be GatedExpertWeights"):
        expert_alignment_cost(gated(0), bias_free(0))
    with pytest.raises(ValueError, match="w_up must have shape"):
        gated_alignment_cost(GatedExpertWeights(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(3, 4)), gated(0))
    with pytest.raises(ValueError, match="experts\\[1\\] is BiasFreeExpertWeights"):
        merge_experts([gated(0), bias_free(0)], [1, 1])


@pytest.mark.parametrize("make,forward", LAYOUTS, ids=["swiglu", "t5"])
def test_merging_aligned_copies_keeps_the_function(make, forward):
    """merge_groups (the method code path) on permuted copies: the merged expert computes the base function."""
    base = make(10)
    g = torch.Generator().manual_seed(11)
    experts = [permute_expert(base, torch.randperm(D_FF, generator=g)) for _ in range(3)] + [make(12)]
    S = torch.tensor([[1.0, 0.9, 0.9, 0.1], [0.9, 1.0, 0.9, 0.1], [0.9, 0.9, 1.0, 0.1], [0.1, 0.1, 0.1, 1.0]])
    freq = torch.tensor([0.4, 0.2, 0.1, 0.3]).numpy()  # centres: experts 0 and 3
    plan = plan_freq_merge(S.numpy(), freq, 2)
    merged, _, _ = merge_groups(experts, freq, plan, workers=1)
    assert [type(m) for m in merged] == [type(base)] * 2
    x = torch.randn(9, D_MODEL)
    torch.testing.assert_close(forward(merged[0], x), forward(base, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged[1].wi if hasattr(merged[1], "wi") else merged[1].w_gate, experts[3][0])


def test_native_layout_is_unchanged():
    g = torch.Generator().manual_seed(0)
    e = ExpertWeights(
        torch.randn(4, 5, generator=g), torch.randn(5, generator=g), torch.randn(5, 4, generator=g), torch.zeros(4)
    )
    assert torch.equal(align_expert(e, e), torch.arange(5))
    assert type(merge_experts([e, e], [1, 3])) is ExpertWeights
