from itertools import permutations

import numpy as np
import pytest
import torch

from smoe_lab.reduce import (
    ExpertWeights,
    align_expert,
    align_experts,
    alignment_cost,
    expert_forward,
    permute_expert,
)


def random_expert(d_model=8, d_ff=16, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return ExpertWeights(
        scale * torch.randn(d_model, d_ff, generator=g),
        scale * torch.randn(d_ff, generator=g),
        scale * torch.randn(d_ff, d_model, generator=g),
        scale * torch.randn(d_model, generator=g),
    )


def perturbed(e, noise, seed):
    g = torch.Generator().manual_seed(seed)
    return ExpertWeights(*(t + noise * torch.randn(t.shape, generator=g) for t in e))


def sq_distance(a, b):
    return sum(((x.double() - y.double()) ** 2).sum().item() for x, y in zip(a, b))


def test_permuting_keeps_the_function():
    e = random_expert(seed=1)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    p = permute_expert(e, perm)
    assert not torch.equal(p.w_in, e.w_in)
    torch.testing.assert_close(expert_forward(p, x), expert_forward(e, x), rtol=1e-5, atol=1e-5)


def test_expert_forward_is_gpt2_mlp():
    e = random_expert(seed=4)
    x = torch.randn(5, 8)
    hidden = x @ e.w_in + e.b_in
    gelu = 0.5 * hidden * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (hidden + 0.044715 * hidden**3)))
    torch.testing.assert_close(expert_forward(e, x), gelu @ e.w_out + e.b_out)


def test_cost_matches_definition_with_biases():
    a, b = random_expert(seed=5), random_expert(seed=6)
    C = alignment_cost(a, b)
    assert C.dtype == torch.float64 and C.shape == (16, 16)
    i, j = 3, 11
    expected = a.w_in[:, i] @ b.w_in[:, j] + a.b_in[i] * b.b_in[j] + a.w_out[i] @ b.w_out[j]
    assert C[i, j].item() == pytest.approx(expected.item(), rel=1e-5)


def test_recovers_planted_permutation_of_perturbed_copy():
    ref = random_expert(d_model=16, d_ff=64, seed=7)
    planted = torch.randperm(64, generator=torch.Generator().manual_seed(8))
    expert = permute_expert(perturbed(ref, 0.05, seed=9), planted)  # expert unit b = copy unit planted[b]
    perm = align_expert(expert, ref)
    assert perm.dtype == torch.long
    assert torch.equal(perm, torch.argsort(planted))  # undoes the planted permutation exactly
    assert torch.equal(planted[perm], torch.arange(64))
    assert sq_distance(permute_expert(expert, perm), ref) < 0.01 * sq_distance(expert, ref)


def test_reference_aligned_to_itself_is_identity():
    ref = random_expert(d_ff=32, seed=10)
    assert torch.equal(align_expert(ref, ref), torch.arange(32))


@pytest.mark.parametrize("d_ff", [2, 4, 6])
def test_optimal_versus_brute_force(d_ff):
    expert, ref = random_expert(d_model=3, d_ff=d_ff, seed=11), random_expert(d_model=3, d_ff=d_ff, seed=12)
    C = alignment_cost(expert, ref).numpy()
    all_perms = np.array(list(permutations(range(d_ff))))  # [d_ff!, d_ff]
    scores = C[all_perms, np.arange(d_ff)].sum(axis=1)  # [d_ff!], sum_b C[perm[b], b]
    perm = align_expert(expert, ref)
    assert C[perm.numpy(), np.arange(d_ff)].sum() == pytest.approx(scores.max(), abs=1e-12)
    # maximising the inner products is minimising the squared distance to the reference
    distances = [sq_distance(permute_expert(expert, torch.from_numpy(p)), ref) for p in all_perms]
    assert sq_distance(permute_expert(expert, perm), ref) <= min(distances) + 1e-9


def test_align_experts_threads_match_serial():
    ref = random_expert(d_ff=48, seed=13)
    experts = [permute_expert(perturbed(ref, 0.1, seed=s), torch.randperm(48)) for s in range(5)]
    serial = align_experts(experts, ref)
    threads_before = torch.get_num_threads()
    threaded = align_experts(experts, ref, workers=2)
    assert torch.get_num_threads() == threads_before  # the temporary thread cap is undone
    assert len(serial) == 5 and all(torch.equal(a, b) for a, b in zip(serial, threaded))
    assert all(torch.equal(a, align_expert(e, ref)) for a, e in zip(serial, experts))
    assert align_experts([], ref, workers=2) == []


def test_bad_inputs():
    e = random_expert()
    with pytest.raises(ValueError, match="differ in shape"):
        align_expert(e, random_expert(d_ff=12))
    with pytest.raises(ValueError, match=r"b_in must have shape \(16,\)"):
        align_expert(ExpertWeights(e.w_in, e.b_in[:3], e.w_out, e.b_out), e)
    with pytest.raises(ValueError, match="w_in must be"):
        alignment_cost(ExpertWeights(e.b_in, e.b_in, e.w_out, e.b_out), e)
    with pytest.raises(ValueError, match="NaN"):
        align_expert(ExpertWeights(e.w_in * float("nan"), e.b_in, e.w_out, e.b_out), e)
    with pytest.raises(ValueError, match="workers"):
        align_experts([e], e, workers=0)


def _objective(C, perm):
    return float(C[perm, np.arange(C.shape[0])].sum())


def _scipy_perm(C):
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(C, maximize=True)
    perm = np.empty_like(rows)
    perm[cols] = rows
    return perm


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "alignment", "ties", "tiny"])
def test_best_assignment_reaches_scipys_optimum(kind, monkeypatch):
    import importlib.util

    from smoe_lab.reduce import align

    fallbacks = []
    scipy_solver = align.linear_sum_assignment
    monkeypatch.setattr(align, "linear_sum_assignment", lambda *a, **k: fallbacks.append(1) or scipy_solver(*a, **k))

    rng = np.random.default_rng(7)
    n = {"tiny": 2}.get(kind, 300)
    C = {
        "uniform": lambda: rng.random((n, n)),
        "gaussian": lambda: rng.standard_normal((n, n)) * 1e3,
        "alignment": lambda: alignment_cost(random_expert(64, n, seed=1, scale=0.02), random_expert(64, n, 2)).numpy(),
        "ties": lambda: rng.integers(0, 3, (n, n)).astype(np.float64),
        "tiny": lambda: rng.random((n, n)),
    }[kind]()
    perm = align._best_assignment(torch.from_numpy(C)).numpy()
    assert sorted(perm.tolist()) == list(range(n))
    if importlib.util.find_spec("lapjv") is not None:
        assert not fallbacks  # LAPJV's answer passed its float64 certificate
    assert _objective(C, perm) == pytest.approx(_objective(C, _scipy_perm(C)), rel=1e-12, abs=1e-12)


def test_best_assignment_without_lapjv_and_on_a_failed_certificate(monkeypatch):
    import sys
    import types

    from smoe_lab.reduce.align import _best_assignment

    C = np.random.default_rng(3).random((50, 50))
    best = _objective(C, _scipy_perm(C))
    monkeypatch.setitem(sys.modules, "lapjv", None)  # not installed -> scipy
    assert _objective(C, _best_assignment(torch.from_numpy(C)).numpy()) == pytest.approx(best, rel=1e-12)
    # A solver answer that is not optimal (identity, zero duals) fails the float64 certificate -> scipy's answer.
    fake = types.SimpleNamespace(lapjv=lambda c: (np.arange(50), np.arange(50), (0.0, np.zeros(50), np.zeros(50))))
    monkeypatch.setitem(sys.modules, "lapjv", fake)
    assert _objective(C, _best_assignment(torch.from_numpy(C)).numpy()) == pytest.approx(best, rel=1e-12)
