"""Cluster analysis of one calibration artifact, for the cluster explorer (notebook 02).

Everything here is computed from the cached artifact (router-logit Gram matrices and frequencies), never from
the model, so changing the layer, the target D or the method in the explorer redraws in milliseconds.

The t-SNE layout is UNCURL's spectral embedding in every view (other methods only colour it by their groups).
`layout="stable"` (the explorer's default) embeds each layer once, at its largest-gap D, so the points stay put
while D changes; `layout="per_d"` re-embeds F at the view's own D (the paper's Sec 6.3 figure), D = 1 included.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .calibrate import Calibration
from .reduce.methods import METHODS, layer_frequencies, layer_method, plan_layer, plan_layers
from .reduce.similarity import similarity_from_gram
from .reduce.spectral import cluster_silhouette, eigengap, spectral_embedding, suggest_num_clusters
from .reduce.stability import cluster_stability
from .router_health import RouterHealth


@dataclass
class LayerView:
    """What the explorer shows for one MoE layer at one (method, D)."""

    layer: int
    method: str
    D: int  # experts this layer keeps (mcsmoe: this layer's share of the global budget)
    S: np.ndarray  # [Z, Z] similarity (1 + cos) / 2
    frequencies: np.ndarray  # [Z] top-1 share on the calibration data
    eigenvalues: np.ndarray  # [Z] normalised-Laplacian spectrum, ascending
    labels: np.ndarray  # [Z] group of each expert (-1 = pruned away)
    centres: list[int]  # [D] reference expert of each group
    F: np.ndarray  # [Z, D] spectral embedding (row-normalised)
    tsne: np.ndarray  # [Z, 2] t-SNE of F
    eigengap: float
    silhouette: float
    suggested_D: int
    requested_D: int = 0  # the D asked for (mcsmoe: per layer, times the layers = the budget)
    budget: int | None = None  # mcsmoe's global budget over all MoE layers; None for per-layer methods
    merge: bool = True  # False: a pruning plan (kept experts as they are, the rest dropped)
    layer_method: str = ""  # the per-layer method on this layer (hybrid: freq_prune on layer 0, uncurl elsewhere)
    tsne_D: int = 0  # the D whose spectral embedding the t-SNE shows (stable layout: the largest-gap D)
    layout: str = "per_d"  # "stable": one t-SNE per layer for every D; "per_d": F at this view's D
    data: str = ""  # what the calibration ran on, e.g. "boolq/train, 62,885 tokens" (for figure titles)

    @property
    def order(self) -> np.ndarray:
        """Experts ordered by group, then by frequency (descending): the heatmap's axis order."""
        key = np.where(self.labels < 0, self.labels.max() + 1, self.labels)
        return np.lexsort((-self.frequencies, key))


def describe_calibration(manifest: dict) -> str:
    """'boolq/train, 62,885 tokens' from a calibration manifest (what figure titles say the data was)."""
    where = "/".join(str(manifest[k]) for k in ("task", "split") if manifest.get(k))
    tokens = manifest.get("tokens")
    return ", ".join(x for x in (where, f"{int(tokens):,} tokens" if tokens else "") if x)


def suggest_d(eigenvalues: np.ndarray) -> int:
    """The D >= 2 after which the Laplacian spectrum has its largest gap: `spectral.suggest_num_clusters` over every
    D in 2..Z-1 (D = 1 is excluded there; see its docstring). Z < 3 leaves nothing to choose: Z."""
    ev = np.asarray(eigenvalues)
    return len(ev) if len(ev) < 3 else suggest_num_clusters(ev, max_d=len(ev))


LAYOUTS = ("stable", "per_d")


def tsne_2d(F: np.ndarray, seed: int = 0) -> np.ndarray:
    """[Z, D] -> [Z, 2] with openTSNE; perplexity adapted to Z (at most (Z - 1) / 3, at most 30, at least 2).

    Any D >= 1: PCA initialisation needs 2 input dimensions, so a one-column F (D = 1: every row is +-1) starts
    from a seeded random layout instead. Z < 4 (too few points for t-SNE) returns F's first two columns (padded)."""
    F = np.ascontiguousarray(F, dtype=np.float64)
    z = F.shape[0]
    if z < 4:
        return np.pad(F[:, :2], ((0, 0), (0, max(0, 2 - F.shape[1]))))
    from openTSNE import TSNE

    perplexity = max(2.0, min(30.0, (z - 1) / 3.0))
    init = "pca" if F.shape[1] >= 2 and np.ptp(F, axis=0).max() > 1e-12 else "random"
    tsne = TSNE(n_components=2, perplexity=perplexity, random_state=seed, initialization=init, n_jobs=1)
    return np.asarray(tsne.fit(F))


class ClusterExplorer:
    """Cached views of a calibration artifact: `view(layer, D, method)`; all MoE layers share one artifact."""

    def __init__(self, cal: Calibration, seed: int = 0, n_init: int = 10, layout: str = "stable"):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown t-SNE layout {layout!r}; known: {list(LAYOUTS)}")
        self.cal = cal
        self.seed = seed
        self.n_init = n_init
        self.layout = layout
        self.data = describe_calibration(cal.manifest)
        self.S = [np.asarray(similarity_from_gram(s.gram)) for s in cal.layers]
        self.freqs = [layer_frequencies(s) for s in cal.layers]  # what reduce_model ranks and averages with
        self._view = lru_cache(maxsize=256)(self._compute)
        self._tsne = lru_cache(maxsize=256)(self._compute_tsne)

    @property
    def num_layers(self) -> int:
        return len(self.S)

    @property
    def experts_per_layer(self) -> list[int]:
        return [s.shape[0] for s in self.S]

    def view(self, layer: int, D: int, method: str = "uncurl", layout: str | None = None) -> LayerView:
        """The view of MoE layer `layer` reduced to D experts by `method` (mcsmoe: D per layer on average, i.e. a
        global budget of D x layers); layout: "stable" or "per_d" (default: the explorer's)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
        layout = layout or self.layout
        if layout not in LAYOUTS:
            raise ValueError(f"unknown t-SNE layout {layout!r}; known: {list(LAYOUTS)}")
        z = self.experts_per_layer[layer]
        if not 1 <= D <= z:
            raise ValueError(f"D must be in [1, Z={z}], got {D}")
        return self._view(layer, D, method, layout)

    def tsne_d(self, layer: int, D: int, layout: str) -> int:
        """The D whose spectral embedding the t-SNE of a view shows: the layer's largest-gap D when stable."""
        if layout == "per_d":
            return D
        _, ev = spectral_embedding(self.S[layer], 1)
        return min(suggest_d(ev), self.experts_per_layer[layer])

    def _compute_tsne(self, layer: int, d: int) -> np.ndarray:
        F, _ = spectral_embedding(self.S[layer], d)
        return tsne_2d(F, self.seed)

    def _compute(self, layer: int, D: int, method: str, layout: str) -> LayerView:
        targets = [min(D, z) for z in self.experts_per_layer]
        budget = None
        if method == "mcsmoe":  # one global budget: the layers' D differ (reduce_model's rule, plan_layers)
            budget = sum(targets)
            plan = plan_layers(self.S, self.freqs, method, targets, self.seed, self.n_init)[layer]
        else:  # per-layer methods: this layer alone, by the same rule reduce_model uses (hybrid, random's seed)
            plan = plan_layer(self.S[layer], self.freqs[layer], method, D, layer, self.seed, self.n_init)
        d_eff = len(plan.centres)
        F, ev = spectral_embedding(self.S[layer], d_eff)
        labels = plan.labels
        t_d = self.tsne_d(layer, d_eff, layout)
        return LayerView(
            layer=layer,
            method=method,
            D=d_eff,
            S=self.S[layer],
            frequencies=self.freqs[layer],
            eigenvalues=np.sort(ev),
            labels=labels,
            centres=plan.centres,
            F=F,
            tsne=self._tsne(layer, t_d),
            eigengap=eigengap(ev, d_eff),
            silhouette=cluster_silhouette(F, labels) if (labels >= 0).all() else float("nan"),
            suggested_D=suggest_d(ev),
            requested_D=D,
            budget=budget,
            merge=plan.merge,
            layer_method=layer_method(method, layer) if method != "mcsmoe" else method,
            tsne_D=t_d,
            layout=layout,
            data=self.data,
        )

    def health(self, layer: int) -> RouterHealth:
        """Router health of MoE layer `layer` on the calibration tokens (entropy / ln E, top-1 gate, shares, drops)."""
        return self.cal.layers[layer].health

    def stability(self, D: int, seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> list[float]:
        """Mean pairwise ARI of UNCURL's clusters across k-means seeds, per layer."""
        return [cluster_stability(S, min(D, S.shape[0]), seeds=seeds) for S in self.S]
