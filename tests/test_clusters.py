import numpy as np
import pytest
from planted import D, Z, batches, planted_model
from sklearn.metrics import adjusted_rand_score

from smoe_lab import plots
from smoe_lab.calibrate import calibrate
from smoe_lab.clusters import ClusterExplorer, suggest_d, tsne_2d
from smoe_lab.reduce.methods import METHODS


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
    # D = 1: a one-column embedding (PCA initialisation needs two); and identical rows
    one = tsne_2d(np.sign(np.random.default_rng(0).normal(size=(12, 1))))
    assert one.shape == (12, 2) and np.isfinite(one).all()
    assert np.isfinite(tsne_2d(np.ones((8, 3)))).all()


@pytest.mark.parametrize("layout", ["stable", "per_d"])
def test_every_d_from_1_to_z_has_a_view_with_every_method(explorer, layout):
    ex, _ = explorer
    for method in METHODS:
        for d in (1, 2, Z - 1, Z):
            v = ex.view(0, d, method, layout=layout)
            assert v.tsne.shape == (Z, 2) and np.isfinite(v.tsne).all(), (method, d)
            assert v.labels.shape == (Z,) and len(v.centres) == v.D
            if method != "mcsmoe":
                assert v.D == d
            for fig in (plots.tsne_scatter(v), plots.similarity_heatmap(v), plots.eigen_spectrum(v)):
                assert fig.data, (method, d)


def test_stable_layout_is_one_per_layer(explorer):
    ex, _ = explorer
    a, b = ex.view(0, 2, layout="stable"), ex.view(0, 7, layout="stable")
    assert a.tsne is b.tsne and a.tsne_D == b.tsne_D == a.suggested_D  # computed once per layer, not per D
    assert ex.view(1, 2, layout="stable").tsne is not a.tsne
    c, d = ex.view(0, 2, layout="per_d"), ex.view(0, 7, layout="per_d")
    assert (c.tsne_D, d.tsne_D) == (2, 7) and not np.allclose(c.tsne, d.tsne)
    with pytest.raises(ValueError, match="layout"):
        ex.view(0, 2, layout="umap")


def test_mcsmoe_view_carries_the_global_budget(explorer):
    ex, _ = explorer
    for d in (1, 3, Z):
        views = [ex.view(layer, d, "mcsmoe") for layer in range(ex.num_layers)]
        assert all(v.budget == d * ex.num_layers and v.requested_D == d for v in views)
        assert sum(v.D for v in views) == d * ex.num_layers
    assert ex.view(0, 3, "uncurl").budget is None


def test_figures_hold_the_view_data(explorer):
    ex, _ = explorer
    v = ex.view(0, D)
    heat = plots.similarity_heatmap(v)
    assert np.allclose(np.asarray(heat.data[0].z), v.S[np.ix_(v.order, v.order)])
    grid = plots.tsne_grid([ex.view(0, D), ex.view(1, D)])
    assert sum(len(t.x) for t in grid.data if t.legendgroup != "key") == 2 * Z  # + the size / ring key
    spec = plots.eigen_spectrum(v)
    assert np.allclose(spec.data[0].y, v.eigenvalues)


def test_tsne_titles_and_legends_say_what_they_show(explorer):
    ex, _ = explorer
    title = plots.tsne_scatter(ex.view(0, D, "freq_merge")).layout.title.text
    assert "UNCURL's spectral embedding" in title and "coloured by freq_merge's groups" in title
    assert "UNCURL's clusters" in plots.tsne_scatter(ex.view(0, D, "uncurl")).layout.title.text
    for method in ("freq_prune", "random"):
        names = {t.name for t in plots.tsne_scatter(ex.view(0, 4, method)).data}
        assert {"kept", "dropped"} <= names and not any(n.startswith("group") for n in names)
    hybrid = {layer: {t.name for t in plots.tsne_scatter(ex.view(layer, 4, "hybrid")).data} for layer in (0, 1)}
    assert "kept" in hybrid[0] and "group 0" in hybrid[1]  # freq_prune on the first MoE layer, uncurl after it
    names = {t.name for t in plots.tsne_scatter(ex.view(0, D)).data}
    assert any(n.startswith("size ~ sqrt(activation freq)") for n in names) and any("black ring" in n for n in names)


def test_group_colours_do_not_repeat():
    for n in (1, 9, 10, 24, 32, 128):
        colors = plots.group_colors(n)
        assert len(colors) == n and len(set(colors)) == n, n


def test_a_32_group_view_has_32_colours(explorer):
    import dataclasses

    ex, _ = explorer
    v = ex.view(0, Z)
    big = dataclasses.replace(v, labels=np.arange(Z) % 32, centres=list(range(Z)))
    fig = plots.tsne_scatter(big)
    colors = [t.marker.color for t in fig.data if t.name.startswith("group")]
    assert len(colors) == Z and len(set(colors)) == Z


@pytest.mark.parametrize("method", ["random", "hybrid", "mcsmoe"])
def test_explorer_shows_exactly_what_reduce_model_does(method):
    """One rule, one place: for every layer and D the explorer's partition is reduce_model's (random's draw and
    hybrid's per-layer choice included)."""
    from smoe_lab.reduce.methods import reduce_model

    model, _, _ = planted_model()
    cal = calibrate(model, batches())
    ex = ClusterExplorer(cal, seed=3)
    for d in (1, 2, 5, Z):
        _, report = reduce_model(model, method, d, cal, seed=3)
        for layer, lr in enumerate(report.layers):
            v = ex.view(layer, d, method)
            assert v.labels.tolist() == lr.labels.tolist() and v.centres == lr.centres, (method, d, layer)
    if method == "random":  # each layer its own draw: the explorer does not repeat layer 0's experts
        assert ex.view(0, 5, method).centres != ex.view(1, 5, method).centres
