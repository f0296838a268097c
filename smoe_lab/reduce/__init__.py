"""Expert reduction: router-logit similarity, spectral clustering, permutation alignment and merging (UNCURL)."""

from .align import (
    ExpertWeights,
    align_expert,
    align_experts,
    align_pairs,
    alignment_cost,
    check_expert,
    expert_forward,
    permute_expert,
)
from .merge import merge_cluster, merge_experts, normalize_weights, stack_experts, unstack_experts
from .methods import METHODS, ROUTER_OPTIONS, ReductionReport, plan_layers, reduce_model
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
    "ExpertWeights",
    "align_expert",
    "align_experts",
    "align_pairs",
    "alignment_cost",
    "canonical_labels",
    "check_expert",
    "cluster_silhouette",
    "cluster_stability",
    "eigengap",
    "expert_forward",
    "kmeans_labels",
    "merge_cluster",
    "merge_experts",
    "normalize_weights",
    "normalized_laplacian",
    "permute_expert",
    "router_gram",
    "router_similarity",
    "router_similarity_loop",
    "similarity_from_gram",
    "spectral_clusters",
    "spectral_embedding",
    "stack_experts",
    "suggest_num_clusters",
    "unstack_experts",
    "METHODS",
    "ROUTER_OPTIONS",
    "ReductionReport",
    "plan_layers",
    "reduce_model",
]
