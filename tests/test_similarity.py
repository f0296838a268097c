import numpy as np
import pytest
import torch

from smoe_lab.reduce import router_gram, router_similarity, router_similarity_loop, similarity_from_gram


def _logits(n=200, z=12, seed=0):
    return torch.randn(n, z, generator=torch.Generator().manual_seed(seed))


def test_matches_pair_loop_and_definition():
    H = _logits()
    S = router_similarity(H)
    assert S.dtype == torch.float64 and S.shape == (12, 12)
    torch.testing.assert_close(S, router_similarity_loop(H), rtol=0, atol=1e-12)
    i, j = 3, 7
    cos = torch.nn.functional.cosine_similarity(H[:, i].double(), H[:, j].double(), dim=0)
    assert S[i, j].item() == pytest.approx((1 + cos.item()) / 2, abs=1e-12)
    assert torch.equal(S, S.T)
    assert torch.all(torch.diagonal(S) == 1.0)
    assert S.min() >= 0 and S.max() <= 1


def test_input_kind_is_kept():
    H = _logits(50, 5)
    S_np = router_similarity(H.numpy())
    assert isinstance(S_np, np.ndarray) and S_np.dtype == np.float64
    np.testing.assert_allclose(S_np, router_similarity(H).numpy(), atol=1e-15)
    assert isinstance(router_similarity_loop(H.numpy()), np.ndarray)


def test_gram_accumulated_over_batches_equals_direct():
    H = _logits(300, 16, seed=1)
    G = sum(router_gram(batch) for batch in H.split(64))
    torch.testing.assert_close(similarity_from_gram(G), router_similarity(H), rtol=0, atol=1e-12)
    assert isinstance(similarity_from_gram(G.numpy()), np.ndarray)


def test_scale_and_sign_structure():
    H = _logits(100, 4, seed=2)
    H2 = torch.stack([H[:, 0], 5.0 * H[:, 0], -H[:, 0], H[:, 3]], dim=1)  # parallel, scaled, opposite
    S = router_similarity(H2)
    assert S[0, 1].item() == pytest.approx(1.0, abs=1e-12)
    assert S[0, 2].item() == pytest.approx(0.0, abs=1e-12)
    # positive per-expert scaling never changes S
    torch.testing.assert_close(router_similarity(H * torch.tensor([1.0, 3.0, 0.1, 7.0])), router_similarity(H))


def test_zero_column_convention():
    H = _logits(40, 3, seed=3)
    H[:, 1] = 0
    for S in (router_similarity(H), router_similarity_loop(H), similarity_from_gram(router_gram(H))):
        assert S[1, 1].item() == 1.0
        assert S[1, 0].item() == 0.5 and S[2, 1].item() == 0.5


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(5), "2-D"),
        (torch.zeros(0, 3), "at least one"),
        (torch.tensor([[1.0, float("nan")]]), "NaN"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "Inf"),
        ([[1.0, 2.0]], "torch.Tensor or numpy.ndarray"),
    ],
)
def test_bad_logits(bad, match):
    for fn in (router_similarity, router_gram, router_similarity_loop):
        with pytest.raises(ValueError, match=match):
            fn(bad)


def test_bad_gram():
    with pytest.raises(ValueError, match="square"):
        similarity_from_gram(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="negative diagonal"):
        similarity_from_gram(-torch.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        similarity_from_gram(torch.full((2, 2), float("inf")))
