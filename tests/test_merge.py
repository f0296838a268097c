import pytest
import torch

from smoe_lab.reduce import (
    ExpertWeights,
    expert_forward,
    merge_cluster,
    merge_experts,
    normalize_weights,
    permute_expert,
    stack_experts,
    unstack_experts,
)


def random_expert(d_model=16, d_ff=64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return ExpertWeights(
        scale * torch.randn(d_model, d_ff, generator=g),
        scale * torch.randn(d_ff, generator=g),
        scale * torch.randn(d_ff, d_model, generator=g),
        scale * torch.randn(d_model, generator=g),
    )


def noisy_permuted_copies(base, count, noise, seed=0):
    """[base] + count-1 copies, each perturbed and with its hidden units shuffled (same function up to noise)."""
    g = torch.Generator().manual_seed(seed)
    copies = [base]
    for _ in range(count - 1):
        noisy = ExpertWeights(*(t + noise * t.std() * torch.randn(t.shape, generator=g) for t in base))
        copies.append(permute_expert(noisy, torch.randperm(base.b_in.numel(), generator=g)))
    return copies


def relative_error(a, b, x):
    ya, yb = expert_forward(a, x), expert_forward(b, x)
    return ((ya - yb).norm() / yb.norm()).item()


def test_merging_identical_experts_returns_the_expert():
    e = random_expert(seed=1)
    merged = merge_experts([e, e, e], [0.2, 0.5, 0.3])
    for got, want in zip(merged, e):
        torch.testing.assert_close(got, want)
        assert got.dtype == want.dtype


def test_weighted_average_matches_manual():
    a, b = random_expert(seed=2), random_expert(seed=3)
    merged = merge_experts([a, b], torch.tensor([3.0, 1.0]))  # normalised to 0.75 / 0.25
    for got, ta, tb in zip(merged, a, b):
        torch.testing.assert_close(got, 0.75 * ta + 0.25 * tb)


def test_weights_normalised_and_zero_fallback():
    torch.testing.assert_close(normalize_weights([2.0, 6.0], 2), torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(normalize_weights([0.0, 0.0, 0.0, 0.0], 4), torch.full((4,), 0.25, dtype=torch.float64))
    a, b = random_expert(seed=4), random_expert(seed=5)
    merged = merge_experts([a, b], [0.0, 0.0])  # a cluster never selected on the task: plain average
    torch.testing.assert_close(merged.w_in, (a.w_in + b.w_in) / 2)


def test_alignment_matters_for_merging():
    base = random_expert(d_model=16, d_ff=64, seed=6)
    copies = noisy_permuted_copies(base, count=4, noise=0.05, seed=7)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(8))
    aligned = merge_cluster(copies, [0.4, 0.3, 0.2, 0.1], members=[0, 1, 2, 3], centre=0)
    naive = merge_experts(copies, [0.4, 0.3, 0.2, 0.1])
    assert relative_error(aligned, base, x) < 0.05
    assert relative_error(naive, base, x) > 0.4


def test_merge_cluster_centre_is_reference_and_frequencies_weight():
    base = random_expert(seed=9)
    copies = noisy_permuted_copies(base, count=3, noise=0.05, seed=10)
    # only the centre's frequency is non-zero: the result is the centre itself, unpermuted
    merged = merge_cluster(copies, [0.0, 0.0, 0.7], members=[2, 0], centre=2)
    for got, want in zip(merged, copies[2]):
        torch.testing.assert_close(got, want)
    # a single-member cluster is the expert itself
    single = merge_cluster(copies, [0.1, 0.2, 0.7], members=[1], centre=1)
    assert all(torch.equal(s, c) for s, c in zip(single, copies[1]))
    # threaded alignment gives the same merge
    serial = merge_cluster(copies, [0.1, 0.2, 0.7], members=[0, 1, 2], centre=1)
    threaded = merge_cluster(copies, [0.1, 0.2, 0.7], members=[0, 1, 2], centre=1, workers=2)
    assert all(torch.equal(s, t) for s, t in zip(serial, threaded))


def test_stack_unstack_roundtrip_in_model_layout():
    experts = [random_expert(d_model=8, d_ff=12, seed=s) for s in range(3)]
    w_in, b_in, w_out, b_out = stack_experts(experts)
    assert w_in.shape == (3, 8, 12) and b_in.shape == (3, 12) and w_out.shape == (3, 12, 8) and b_out.shape == (3, 8)
    back = unstack_experts(w_in, b_in, w_out, b_out)
    assert all(torch.equal(x, y) for a, b in zip(back, experts) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "weights, match",
    [([1.0], "1 merge weights for 2"), ([1.0, -0.5], "non-negative"), ([1.0, float("nan")], "NaN")],
)
def test_bad_weights(weights, match):
    e = random_expert(seed=11)
    with pytest.raises(ValueError, match=match):
        merge_experts([e, e], weights)


def test_bad_experts_and_clusters():
    e, small = random_expert(seed=12), random_expert(d_ff=8, seed=13)
    with pytest.raises(ValueError, match="at least one expert"):
        merge_experts([], [])
    with pytest.raises(ValueError, match=r"experts\[1\] has"):
        merge_experts([e, small], [1.0, 1.0])
    with pytest.raises(ValueError, match="holds 2 experts"):
        unstack_experts(*(t[:2] if i == 1 else t for i, t in enumerate(stack_experts([e, e, e]))))
    with pytest.raises(ValueError, match="not a member"):
        merge_cluster([e, e], [1.0, 1.0], members=[0], centre=1)
    with pytest.raises(ValueError, match="repeat"):
        merge_cluster([e, e], [1.0, 1.0], members=[0, 0], centre=0)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        merge_cluster([e, e], [1.0, 1.0], members=[0, 2], centre=0)
    with pytest.raises(ValueError, match="no members"):
        merge_cluster([e, e], [1.0, 1.0], members=[], centre=0)
    with pytest.raises(ValueError, match="3 merge weights for 2"):
        merge_cluster([e, e], [1.0, 1.0, 1.0], members=[0], centre=0)
