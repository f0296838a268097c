"""Plotly figures used by the notebooks and the replication report, and the building blocks they share (house
layout, mean ± sd traces, reference lines, forest plot). Every figure can be saved as HTML + PNG with `save_figure`.

Split by what the figures show: core (house style, building blocks), clusters (notebook 02), accuracy (03 and the
report), cost (04); every name stays importable as smoe_lab.plots.<name>."""

from .accuracy import (  # noqa: F401
    ACCURACY_METRICS,
    ONE_CLASS_SHARE,
    _n_of,
    _one_class,
    accuracy_vs_experts,
    interval,
    stagger,
)
from .clusters import (  # noqa: F401
    _add_tsne_key,
    _add_tsne_traces,
    _budget_note,
    _coloured_by,
    _data_note,
    _group_name,
    _is_pruning,
    _marker_sizes,
    eigen_spectrum,
    group_colors,
    similarity_heatmap,
    stability_bars,
    tsne_grid,
    tsne_scatter,
    tsne_title,
)
from .core import (  # noqa: F401
    DROPPED,
    PALETTE,
    experts_axis,
    forest_plot,
    iqr_error,
    loss_curves,
    mean_sd_bars,
    mean_sd_trace,
    save_figure,
    use_mimetype_renderer,
    white_layout,
    zero_line,
)
from .cost import (  # noqa: F401
    latency_note,
    loss_vs_latency,
    moe_breakdown_bars,
    router_health_curves,
)
