import numpy as np
import pytest
from planted import D, Z, batches, planted_model
from sklearn.metrics import adjusted_rand_score

from smoe_lab import plots
from smoe_lab.calibrate import calibrate
from smoe_lab.clusters import ClusterExplorer, suggest_d, tsne_2d


@pytest.fixture(scope="module")
def explorer():
    model, groups, _ = planted_model()
    return ClusterExplorer(calibrate(model, batches())), groups


def test_views_recover_planted_groups_and_are_cached(explorer):
    ex, groups = explorer
    v = ex.view(1, D, "uncurl")
    assert adjusted_rand_score(groups, v.labels) == 1.0
    assert v.suggested_D == D and v.tsne.shape == (Z, 2) and v.F.shape == (Z, D)
    assert ex.view(1, D, "uncurl") is v  # redraws come from the cache
    order = v.order
    assert sorted(order.tolist()) == list(range(Z))
    assert (np.diff(v.labels[order]) >= 0).all()  # heatmap axis grouped by cluster


def test_every_method_has_a_view(explorer):
    ex, _ = explorer
    for method in ("uncurl", "freq_prune", "freq_merge", "mcsmoe", "random", "hybrid"):
        v = ex.view(0, 4, method)
        assert len(v.centres) == v.D and v.labels.shape == (Z,)
    assert (ex.view(0, 4, "freq_prune").labels == -1).sum() == Z - 4


def test_bad_view_arguments(explorer):
    ex, _ = explorer
    with pytest.raises(ValueError, match="layer"):
        ex.view(5, 2)
    with pytest.raises(ValueError, match=r"D must be in \[1, Z=12\]"):
        ex.view(0, 13)
    with pytest.raises(ValueError, match="unknown method"):
        ex.view(0, 2, "kmeans")


def test_stability_is_one_on_clean_structure(explorer):
    ex, _ = explorer
    assert ex.stability(D, (0, 1, 2)) == pytest.approx([1.0, 1.0])


def test_suggest_d_skips_the_trivial_first_gap():
    ev = np.array([0.0, 0.75, 0.8, 1.0, 1.0, 1.0])
    assert suggest_d(ev) == 3


def test_tsne_small_inputs():
    assert tsne_2d(np.random.default_rng(0).normal(size=(3, 2))).shape == (3, 2)
    assert tsne_2d(np.random.default_rng(0).normal(size=(9, 3))).shape == (9, 2)


def test_figures_hold_the_view_data(explorer):
    ex, _ = explorer
    v = ex.view(0, D)
    heat = plots.similarity_heatmap(v)
    assert np.allclose(np.asarray(heat.data[0].z), v.S[np.ix_(v.order, v.order)])
    grid = plots.tsne_grid([ex.view(0, D), ex.view(1, D)])
    assert sum(len(t.x) for t in grid.data) == 2 * Z
    spec = plots.eigen_spectrum(v)
    assert np.allclose(spec.data[0].y, v.eigenvalues)


@pytest.mark.parametrize("method", ["random", "hybrid", "mcsmoe"])
def test_explorer_shows_exactly_what_reduce_model_does(method):
    """One rule, one place: for every layer and D the explorer's partition is reduce_model's (random's draw and
    hybrid's per-layer choice included)."""
    from smoe_lab.reduce.methods import reduce_model

    model, _, _ = planted_model()
    cal = calibrate(model, batches())
    ex = ClusterExplorer(cal, seed=3)
    for d in (2, 5):
        _, report = reduce_model(model, method, d, cal, seed=3)
        for layer, lr in enumerate(report.layers):
            v = ex.view(layer, d, method)
            assert v.labels.tolist() == lr.labels.tolist() and v.centres == lr.centres, (method, d, layer)
