"""Expert reduction: router-logit similarity, spectral clustering, permutation alignment and merging (UNCURL)."""

from .similarity import router_gram, router_similarity, router_similarity_loop, similarity_from_gram

__all__ = ["router_gram", "router_similarity", "router_similarity_loop", "similarity_from_gram"]
