"""ipywidgets controls for the cluster explorer (notebook 02 with `interactive = True`).

The controls (MoE layer, target D, method, t-SNE layout) sit at the top; the info line and the three figures (t-SNE,
similarity heatmap, spectrum) sit below them in a grid. Every redraw comes from a `ClusterExplorer`, i.e. from the
cached calibration artifact: no router logits are recomputed. `ExplorerWidget.figures` always holds the figures
last drawn, which is what the tests inspect after changing a control. A redraw that fails clears the figures and
puts the error in the info line (`ExplorerWidget.error`), so the page never shows figures of an earlier setting.
"""

from __future__ import annotations

import html
import math
from typing import Any

import ipywidgets as w
from IPython.display import display

from . import plots
from .clusters import LAYOUTS, ClusterExplorer, LayerView
from .reduce.methods import METHODS
from .router_health import RouterHealth, describe, specialisation_warning

FIGURES = ("tsne", "heatmap", "spectrum")
CSS_CLASS = "smoe-explorer"  # on the explorer's outer box (the browser test finds it by this class)
ERROR_MARK = "redraw failed"  # the info line's prefix after a failed redraw (the browser test looks for it)
LAYOUT_LABELS = {"stable": "fixed per layer", "per_d": "re-embedded per D"}
# figure sizes in the explorer: two per row fit a 1440-pixel-wide JupyterLab with its file browser open
WIDTH, HEIGHT = 480, 430


def health_line(h: RouterHealth) -> str:
    """The info line's router health (calibration tokens); a warning when the layer's router stayed near uniform."""
    warn = specialisation_warning([h.entropy_ratio])
    return describe(h) + (" <b>- routers did not specialise (~1/E of an FFN)</b>" if warn else "")


def budget_line(view: LayerView, num_layers: int) -> str:
    """mcsmoe's global budget and this layer's share of it, e.g. "budget 8 x 2 layers: 5 here"; else ""."""
    if view.budget is None:
        return ""
    return f"; global budget {view.requested_D} x {num_layers} layers = {view.budget}: <b>{view.D} here</b>"


def silhouette_text(view: LayerView) -> str:
    """The silhouette, or why there is none: a pruning method forms no groups (dropped experts carry no label), and
    the score needs 2 <= groups < Z (not at D = 1 or D = Z)."""
    if math.isfinite(view.silhouette):
        return f"silhouette {view.silhouette:.3f}"
    return "silhouette n/a (pruned: no groups)" if (view.labels < 0).any() else "silhouette n/a (needs 2 <= D < Z)"


def info_line(explorer: ClusterExplorer, view: LayerView) -> str:
    z = explorer.experts_per_layer[view.layer]
    kept = float(view.frequencies[view.centres].sum())
    who = "kept experts" if not view.merge else "centres"
    return (
        f"<b>layer {view.layer}</b>: Z={z} -> D={view.D} with <b>{view.method}</b>"
        f"{budget_line(view, explorer.num_layers)}; {who} carry {kept:.1%} of the tokens; "
        f"eigengap {view.eigengap:.3f}; {silhouette_text(view)}; largest-gap D = {view.suggested_D}"
        f"<br>{health_line(explorer.health(view.layer))}"
    )


class ExplorerWidget:
    def __init__(
        self, explorer: ClusterExplorer, layer: int = 0, D: int = 4, method: str = "uncurl", layout: str | None = None
    ):
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
        self.layout = w.ToggleButtons(
            options=[(LAYOUT_LABELS[k], k) for k in LAYOUTS], value=layout or explorer.layout, description="t-SNE"
        )
        self.method.add_class("smoe-method")
        self.layout.add_class("smoe-layout")
        self.info = w.HTML()
        self.outs = {name: w.Output() for name in FIGURES}
        self.figures: dict[str, Any] = {}
        self.error: str | None = None
        for control in (self.layer, self.D, self.method, self.layout):
            control.observe(self._on_change, names="value")
        controls = w.VBox(
            [w.HBox([self.layer, self.D]), self.method, self.layout, self.info],
            layout=w.Layout(border_bottom="1px solid #ddd", padding="0 0 4px 0"),
        )
        grid = w.GridBox(
            [self.outs[name] for name in FIGURES],
            layout=w.Layout(grid_template_columns=f"repeat(auto-fill, minmax({WIDTH}px, 1fr))", grid_gap="4px"),
        )
        self.box = w.VBox([controls, grid])
        self.box.add_class(CSS_CLASS)
        self.redraw()

    def _on_change(self, _change: dict) -> None:
        self.redraw()

    def _figures(self, view: LayerView) -> dict[str, Any]:
        return {
            "tsne": plots.tsne_scatter(view, width=WIDTH, height=HEIGHT),
            "heatmap": plots.similarity_heatmap(view, width=WIDTH, height=HEIGHT),
            "spectrum": plots.eigen_spectrum(view, width=WIDTH, height=HEIGHT - 100),
        }

    def redraw(self) -> None:
        """Draw the figures of the current controls; on any error clear them and show the error in the info line."""
        layer = self.layer.value
        try:
            z = self.explorer.experts_per_layer[layer]
            view = self.explorer.view(layer, min(self.D.value, z), self.method.value, self.layout.value)
            figures = self._figures(view)
            info = info_line(self.explorer, view)
        except Exception as e:  # noqa: BLE001 (any failure must reach the page, not only the kernel log)
            self.figures, self.error = {}, f"{type(e).__name__}: {e}"
            self.info.value = (
                f"<b>layer {layer}</b>: D={self.D.value}, {self.method.value}: "
                f"<b style='color:#c00'>{ERROR_MARK}</b>: {html.escape(self.error)}"
            )
            for out in self.outs.values():
                out.clear_output()
            return
        self.figures, self.error = figures, None
        self.info.value = info
        for name, out in self.outs.items():
            out.clear_output(wait=True)
            with out:
                figures[name].show()

    def _ipython_display_(self) -> None:
        display(self.box)
