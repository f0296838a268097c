from itertools import combinations

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import laplacian
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score

from smoe_lab.reduce import (
    canonical_labels,
    cluster_silhouette,
    cluster_stability,
    eigengap,
    kmeans_labels,
    normalized_laplacian,
    router_similarity,
    spectral_clusters,
    spectral_embedding,
    suggest_num_clusters,
)


def planted_similarity(z=24, d=4, within=0.85, across=0.25, noise=0.05, seed=0):
    """(S [z, z], groups [z]): d shuffled groups, high similarity within, low across, symmetric noise."""
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.arange(z) % d)  # [z]
    same = groups[:, None] == groups[None, :]  # [z, z]
    E = rng.uniform(-noise, noise, size=(z, z))
    S = np.where(same, within, across) + (E + E.T) / 2
    np.fill_diagonal(S, 1.0)
    return S, groups


def planted_logits(n=2000, z=16, d=4, jitter=0.05, seed=0):
    """(H [n, z], groups [z]): experts in one group have nearly equal router-logit columns."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randperm(z, generator=g) % d  # [z]
    prototypes = torch.randn(n, d, generator=g)  # [n, d]
    H = prototypes[:, groups] + jitter * torch.randn(n, z, generator=g)  # [n, z]
    return H, groups.numpy()


def test_laplacian_matches_scipy_when_diagonal_is_zero():
    S, _ = planted_similarity(z=10, d=2)
    np.fill_diagonal(S, 0.0)
    np.testing.assert_allclose(normalized_laplacian(S), laplacian(S, normed=True), atol=1e-12)


def test_laplacian_keeps_diagonal():
    S, _ = planted_similarity(z=8, d=2)
    d = S.sum(1)
    np.testing.assert_allclose(normalized_laplacian(S), np.eye(8) - S / np.sqrt(np.outer(d, d)), atol=1e-14)
    assert not np.allclose(normalized_laplacian(S), laplacian(S, normed=True))


def test_embedding_properties():
    S, _ = planted_similarity()
    F, ev = spectral_embedding(torch.from_numpy(S), 4)
    assert F.shape == (24, 4) and ev.shape == (24,)
    np.testing.assert_allclose(np.linalg.norm(F, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(ev, np.linalg.eigvalsh(normalized_laplacian(S)), atol=1e-12)
    assert np.all(np.diff(ev) >= 0) and ev[0] == pytest.approx(0.0, abs=1e-12)
    F2, _ = spectral_embedding(S.copy(), 4)
    np.testing.assert_array_equal(F, F2)


def test_eigenvector_sign_convention():
    S, _ = planted_similarity(z=7, d=2)
    V, ev = spectral_embedding(S, 7)  # D == Z: rows of an orthogonal matrix are already unit length
    np.testing.assert_allclose(V.T @ V, np.eye(7), atol=1e-12)
    L = normalized_laplacian(S)
    np.testing.assert_allclose(L @ V, V * ev[None, :], atol=1e-12)
    assert np.all(V[np.argmax(np.abs(V), axis=0), np.arange(7)] > 0)


def test_matches_sklearn_spectral_clustering_on_planted_groups():
    S, groups = planted_similarity()
    labels, F = spectral_clusters(S, 4)
    ref = SpectralClustering(n_clusters=4, affinity="precomputed", random_state=0).fit_predict(S)
    assert adjusted_rand_score(labels, ref) == 1.0
    assert adjusted_rand_score(labels, groups) == 1.0
    assert labels.dtype == np.int64 and set(labels.tolist()) == {0, 1, 2, 3}
    assert F.shape == (24, 4)


def test_recovers_planted_groups_from_router_logits():
    H, groups = planted_logits()
    labels, _ = spectral_clusters(router_similarity(H), 4)
    assert adjusted_rand_score(labels, groups) == 1.0


def test_labels_canonical_and_equivariant_under_expert_permutation():
    S, _ = planted_similarity(seed=3)
    labels, _ = spectral_clusters(S, 4)
    _, first = np.unique(labels, return_index=True)
    assert labels[0] == 0 and np.all(np.diff(first) > 0)  # clusters numbered by smallest member
    p = np.random.default_rng(1).permutation(24)
    labels_p, _ = spectral_clusters(S[np.ix_(p, p)], 4)
    assert adjusted_rand_score(labels_p, labels[p]) == 1.0
    np.testing.assert_array_equal(labels_p, canonical_labels(labels[p]))


def test_extreme_cluster_counts():
    S, _ = planted_similarity(z=9, d=3)
    np.testing.assert_array_equal(spectral_clusters(S, 9)[0], np.arange(9))
    np.testing.assert_array_equal(spectral_clusters(S, 1)[0], np.zeros(9))


def test_identical_experts_still_give_d_nonempty_clusters():
    H, _ = planted_logits(n=300, z=6, d=6, jitter=0.0)
    H[:, 1] = H[:, 2] = H[:, 0]  # three experts with identical router columns: 4 distinct embedding rows
    labels, _ = spectral_clusters(router_similarity(H), 5)
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3, 4]
    assert kmeans_labels(np.zeros((4, 2)), 3).tolist() == [0, 0, 1, 2]


def test_eigengap_and_suggestion_find_planted_count():
    S, _ = planted_similarity(z=24, d=4)
    _, ev = spectral_embedding(S, 1)
    assert suggest_num_clusters(ev, max_d=10) == 4
    assert eigengap(ev, 4) == pytest.approx(ev[4] - ev[3])
    assert eigengap(ev, 4) > max(eigengap(ev, d) for d in (2, 3, 5, 6))
    assert np.isnan(eigengap(ev, 24))
    assert eigengap(ev, 1) > eigengap(ev, 4)  # the connected-graph gap, which min_d=2 skips
    assert suggest_num_clusters(ev, max_d=10, min_d=1) == 1
    assert suggest_num_clusters(ev[:2], max_d=5) == 2  # Z <= min_d: nothing to choose


def test_silhouette():
    S, _ = planted_similarity()
    labels, F = spectral_clusters(S, 4)
    assert cluster_silhouette(F, labels) > 0.9
    assert cluster_silhouette(F, np.arange(24) % 4) < 0.2  # a wrong partition scores far lower
    assert np.isnan(cluster_silhouette(F, np.zeros(24, dtype=int)))
    assert np.isnan(cluster_silhouette(F, np.arange(24)))


def test_stability():
    S, _ = planted_similarity()
    assert cluster_stability(S, 4) == 1.0
    assert cluster_stability(S, 4, seeds=(7,)) == 1.0
    noisy = np.random.default_rng(0).uniform(0, 1, size=(24, 24))
    noisy = (noisy + noisy.T) / 2
    runs = [spectral_clusters(noisy, 6, seed=s, n_init=1)[0] for s in range(4)]
    expected = np.mean([adjusted_rand_score(a, b) for a, b in combinations(runs, 2)])
    assert cluster_stability(noisy, 6, seeds=range(4), n_init=1) == pytest.approx(expected)


@pytest.mark.parametrize(
    "S, k, match",
    [
        (np.ones((3, 4)), 2, "square"),
        (np.array([[1.0, 0.2], [0.5, 1.0]]), 1, "not symmetric"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), 1, "NaN"),
        (np.array([[1.0, -0.5], [-0.5, 1.0]]), 1, "negative"),
        (np.zeros((2, 2)), 1, "zero degree"),
        (np.eye(3), 0, r"num_clusters must be in \[1, Z=3\]"),
        (np.eye(3), 4, r"num_clusters must be in \[1, Z=3\]"),
        (np.eye(3), 2.0, "must be an int"),
        ("S", 1, "torch.Tensor or numpy.ndarray"),
    ],
)
def test_bad_inputs(S, k, match):
    with pytest.raises(ValueError, match=match):
        spectral_clusters(S, k)


def test_bad_eigen_helpers():
    with pytest.raises(ValueError, match="num_clusters"):
        eigengap(np.arange(3.0), 0)
    with pytest.raises(ValueError, match="max_d"):
        suggest_num_clusters(np.arange(3.0), 1)
    with pytest.raises(ValueError, match="min_d"):
        suggest_num_clusters(np.arange(3.0), 3, min_d=0)
    with pytest.raises(ValueError, match="disagree"):
        cluster_silhouette(np.zeros((3, 2)), np.zeros(4))
