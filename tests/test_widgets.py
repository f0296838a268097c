"""The explorer's controls redraw from the cached artifact: changing a control changes the figures' data."""

import numpy as np
import pytest
from planted import D, batches, planted_model

from smoe_lab.calibrate import calibrate
from smoe_lab.clusters import ClusterExplorer
from smoe_lab.widgets import ExplorerWidget


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
    assert "pruned" in names  # pruned experts are drawn as their own grey group
    widget.method.value = "uncurl"
    assert "pruned" not in {t.name for t in widget.figures["tsne"].data}
