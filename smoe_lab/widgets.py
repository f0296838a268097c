"""ipywidgets controls for the cluster explorer (notebook 02 with `interactive = True`).

The controls (MoE layer, target D, method) redraw from a `ClusterExplorer`, i.e. from the cached calibration
artifact: no router logits are recomputed. `ExplorerWidget.figures` always holds the figures last drawn, which is
what the tests inspect after changing a control.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w
from IPython.display import display

from . import plots
from .clusters import ClusterExplorer
from .reduce.methods import METHODS
from .router_health import RouterHealth, describe, specialisation_warning


def health_line(h: RouterHealth) -> str:
    """The info line's router health (calibration tokens); a warning when the layer's router stayed near uniform."""
    warn = specialisation_warning([h.entropy_ratio])
    return describe(h) + (" <b>- routers did not specialise (~1/E of an FFN)</b>" if warn else "")


class ExplorerWidget:
    def __init__(self, explorer: ClusterExplorer, layer: int = 0, D: int = 4, method: str = "uncurl"):
        self.explorer = explorer
        z_max = max(explorer.experts_per_layer)
        self.layer = w.Dropdown(
            options=[(f"MoE layer {i} (Z={z})", i) for i, z in enumerate(explorer.experts_per_layer)],
            value=layer,
            description="layer",
        )
        self.D = w.IntSlider(
            value=min(D, z_max), min=1, max=z_max, step=1, description="target D", continuous_update=False
        )
        self.method = w.ToggleButtons(options=list(METHODS), value=method, description="method")
        self.info = w.HTML()
        self.out = w.Output()
        self.figures: dict[str, Any] = {}
        for control in (self.layer, self.D, self.method):
            control.observe(self._on_change, names="value")
        self.box = w.VBox([w.HBox([self.layer, self.D]), self.method, self.info, self.out])
        self.redraw()

    def _on_change(self, _change: dict) -> None:
        self.redraw()

    def redraw(self) -> None:
        layer = self.layer.value
        z = self.explorer.experts_per_layer[layer]
        d = min(self.D.value, z)
        view = self.explorer.view(layer, d, self.method.value)
        self.figures = {
            "heatmap": plots.similarity_heatmap(view),
            "spectrum": plots.eigen_spectrum(view),
            "tsne": plots.tsne_scatter(view),
        }
        kept = float(view.frequencies[view.centres].sum())
        self.info.value = (
            f"<b>layer {layer}</b>: Z={z} -> D={view.D} with <b>{view.method}</b>; centres carry {kept:.1%} of the "
            f"tokens; eigengap {view.eigengap:.3f}; silhouette {view.silhouette:.3f}; "
            f"largest-gap D = {view.suggested_D}<br>{health_line(self.explorer.health(layer))}"
        )
        self.out.clear_output(wait=True)
        with self.out:
            for fig in self.figures.values():
                fig.show()

    def _ipython_display_(self) -> None:
        display(self.box)
