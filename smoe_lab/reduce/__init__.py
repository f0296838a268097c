"""Expert reduction: router-logit similarity, spectral clustering, permutation alignment and merging (UNCURL)."""

from .similarity import router_gram, router_similarity, router_similarity_loop, similarity_from_gram
from .spectral import (
    canonical_labels,
    cluster_silhouette,
    eigengap,
    kmeans_labels,
    normalized_laplacian,
    spectral_clusters,
    spectral_embedding,
    suggest_num_clusters,
)
from .stability import cluster_stability

__all__ = [
    "canonical_labels",
    "cluster_silhouette",
    "cluster_stability",
    "eigengap",
    "kmeans_labels",
    "normalized_laplacian",
    "router_gram",
    "router_similarity",
    "router_similarity_loop",
    "similarity_from_gram",
    "spectral_clusters",
    "spectral_embedding",
    "suggest_num_clusters",
]
