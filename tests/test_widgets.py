"""The explorer's controls redraw from the cached artifact: changing a control changes the figures' data."""

import re

import numpy as np
import pytest
from planted import D, Z, batches, planted_model

from smoe_lab.calibrate import calibrate
from smoe_lab.clusters import ClusterExplorer
from smoe_lab.reduce.methods import METHODS
from smoe_lab.widgets import ERROR_MARK, ExplorerWidget


@pytest.fixture(scope="module")
def widget():
    model, _, _ = planted_model()
    # give the two layers different routers so that their figures differ
    return ExplorerWidget(ClusterExplorer(calibrate(model, batches())), layer=0, D=D)


def _heat(w):
    return np.asarray(w.figures["heatmap"].data[0].z)


def test_changing_layer_redraws(widget):
    before = _heat(widget)
    widget.layer.value = 1
    after = _heat(widget)
    assert not np.allclose(before, after)
    v = widget.explorer.view(1, D)
    assert np.allclose(after, v.S[np.ix_(v.order, v.order)])
    assert "layer 1" in widget.info.value


def test_changing_d_and_method_redraws(widget):
    widget.D.value = 2
    assert "D=2" in widget.figures["tsne"].layout.title.text
    widget.method.value = "freq_prune"
    names = {t.name for t in widget.figures["tsne"].data}
    assert {"kept", "dropped"} <= names  # pruning: kept / dropped, not groups
    widget.method.value = "uncurl"
    assert "dropped" not in {t.name for t in widget.figures["tsne"].data}


def test_every_d_and_method_draws(widget):
    for layout in ("stable", "per_d"):
        widget.layout.value = layout
        for method in METHODS:
            widget.method.value = method
            for d in (1, Z, D):
                widget.D.value = d
                assert widget.error is None, (layout, method, d, widget.error)
                assert set(widget.figures) == {"tsne", "heatmap", "spectrum"}
                assert ERROR_MARK not in widget.info.value
                if method != "mcsmoe":
                    assert f"D={d}" in widget.figures["tsne"].layout.title.text
    widget.layout.value, widget.method.value = "stable", "uncurl"


def test_mcsmoe_info_line_names_the_budget(widget):
    widget.method.value = "mcsmoe"
    widget.D.value = 3
    n = widget.explorer.num_layers
    here = widget.explorer.view(widget.layer.value, 3, "mcsmoe").D
    assert f"global budget 3 x {n} layers = {3 * n}: <b>{here} here</b>" in widget.info.value
    widget.method.value = "uncurl"
    assert "budget" not in widget.info.value


def test_a_failed_redraw_shows_the_error_and_no_stale_figures(widget, monkeypatch):
    widget.D.value = D
    assert widget.figures

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(widget.explorer, "view", broken)
    widget.D.value = 2
    assert widget.figures == {} and widget.error == "RuntimeError: planted failure"
    assert ERROR_MARK in widget.info.value and "planted failure" in widget.info.value
    assert all(not out.outputs for out in widget.outs.values())
    monkeypatch.undo()
    widget.D.value = D
    assert widget.error is None and widget.figures and ERROR_MARK not in widget.info.value


def test_silhouette_says_why_it_is_missing(widget):
    widget.method.value = "uncurl"
    widget.D.value = 1
    assert "silhouette n/a (needs 2 <= D < Z)" in widget.info.value and "nan" not in widget.info.value
    widget.D.value = Z
    assert "silhouette n/a (needs 2 <= D < Z)" in widget.info.value
    widget.D.value = 2
    assert re.search(r"silhouette -?\d\.\d{3};", widget.info.value)
    widget.method.value = "freq_prune"  # dropped experts carry no group: no silhouette, for that reason
    assert "silhouette n/a (pruned: no groups)" in widget.info.value
