"""How stable is a spectral clustering of experts under the k-means seed?"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from .spectral import kmeans_labels, spectral_embedding


def cluster_stability(
    S: torch.Tensor | np.ndarray, D: int, seeds: Sequence[int] = (0, 1, 2, 3, 4), n_init: int = 10
) -> float:
    """Mean pairwise adjusted Rand index of `spectral_clusters(S, D, seed)` labels over the seeds.

    1.0 means every seed gives the same partition; 1.0 also when fewer than 2 seeds are given. The embedding is
    computed once (it does not depend on the seed); only k-means is rerun.
    """
    F, _ = spectral_embedding(S, D)  # [Z, D]
    labels = [kmeans_labels(F, D, seed=int(seed), n_init=n_init) for seed in seeds]  # each [Z]
    if len(labels) < 2:
        return 1.0
    return float(np.mean([adjusted_rand_score(a, b) for a, b in combinations(labels, 2)]))
