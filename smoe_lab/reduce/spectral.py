"""Spectral clustering of experts from their similarity matrix S (UNCURL Algorithm 1, lines 6-7).

Ng-Jordan-Weiss: the D eigenvectors of the smallest eigenvalues of the symmetric normalised Laplacian
L = I - D^-1/2 S D^-1/2, rows normalised to unit length, then k-means with D clusters.

Choices where the paper leaves one:
- S's diagonal is kept (each expert is its own neighbour with weight S_ii = 1 from `router_similarity`), so the
  degree is d_i = sum_j S_ij including the self term. scikit-learn (scipy.sparse.csgraph.laplacian, normed=True)
  instead zeroes the diagonal of the affinity before normalising. The two agree exactly when diag(S) = 0; on
  clustered S they give the same partition (tests compare with sklearn.cluster.SpectralClustering).
  sklearn's embedding is also not row-normalised (it rescales by D^-1/2 instead); ours is NJW.
- Eigenvectors come from numpy.linalg.eigh in float64; each is signed so that its largest-|.| entry (the first one
  on ties) is positive, so F is reproducible. When lambda_D == lambda_{D+1} the D-dimensional eigenspace is not
  unique and neither is F (`eigengap` is then 0): no sign rule can fix that, the clustering itself is ambiguous.
- Labels are canonical: cluster 0 holds expert 0, and clusters are numbered by their smallest member index.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

SYMMETRY_TOL = 1e-8


def _as_similarity(S: torch.Tensor | np.ndarray) -> np.ndarray:
    """S as a validated float64 ndarray [Z, Z]: square, finite, symmetric, non-negative."""
    if isinstance(S, torch.Tensor):
        S = S.detach().cpu().to(torch.float64).numpy()
    elif not isinstance(S, np.ndarray):
        raise ValueError(f"similarity S must be a torch.Tensor or numpy.ndarray, got {type(S).__name__}")
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or S.shape[0] < 1:
        raise ValueError(f"similarity S must be a square [Z, Z] matrix, got shape {S.shape}")
    if not np.isfinite(S).all():
        raise ValueError("similarity S contains NaN or Inf")
    asym = np.abs(S - S.T).max()
    if asym > SYMMETRY_TOL * max(1.0, np.abs(S).max()):
        raise ValueError(f"similarity S is not symmetric (max |S - S^T| = {asym:.3g})")
    if (S < 0).any():
        raise ValueError("similarity S has negative entries; an affinity must be >= 0")
    return (S + S.T) / 2.0


def _check_num_clusters(num_clusters: int, Z: int) -> int:
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)):
        raise ValueError(f"num_clusters must be an int, got {type(num_clusters).__name__}")
    if not 1 <= num_clusters <= Z:
        raise ValueError(f"num_clusters must be in [1, Z={Z}], got {num_clusters}")
    return int(num_clusters)


def normalized_laplacian(S: torch.Tensor | np.ndarray) -> np.ndarray:
    """L [Z, Z] = I - D^-1/2 S D^-1/2 with d_i = sum_j S_ij (diagonal of S kept; see module doc)."""
    S = _as_similarity(S)  # [Z, Z]
    degree = S.sum(axis=1)  # [Z]
    if (degree <= 0).any():
        raise ValueError(f"similarity S has an expert with zero degree (row {int(np.argmin(degree))} is all zero)")
    inv_sqrt = 1.0 / np.sqrt(degree)  # [Z]
    return np.eye(S.shape[0]) - inv_sqrt[:, None] * S * inv_sqrt[None, :]  # [Z, Z]


def _fix_signs(V: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-|.| entry (first on ties) is positive."""
    rows = np.argmax(np.abs(V), axis=0)  # [K]
    signs = np.sign(V[rows, np.arange(V.shape[1])])  # [K]
    return V * np.where(signs == 0, 1.0, signs)[None, :]


def spectral_embedding(S: torch.Tensor | np.ndarray, D: int) -> tuple[np.ndarray, np.ndarray]:
    """(F [Z, D], eigenvalues [Z]): the D eigenvectors of L with the smallest eigenvalues, rows at unit length.

    eigenvalues are all Z eigenvalues of L in ascending order (for `eigengap` / `suggest_num_clusters`).
    """
    L = normalized_laplacian(S)  # [Z, Z]
    D = _check_num_clusters(D, L.shape[0])
    eigenvalues, V = np.linalg.eigh(L)  # [Z], [Z, Z] ascending
    F = _fix_signs(V[:, :D])  # [Z, D]
    norms = np.linalg.norm(F, axis=1, keepdims=True)  # [Z, 1]
    return F / np.where(norms > 0, norms, 1.0), eigenvalues


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber cluster ids so that clusters are ordered by their smallest member index (labels[0] == 0)."""
    labels = np.asarray(labels)
    ids, first = np.unique(labels, return_index=True)  # [K], [K]
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(ids))
    return rank[np.searchsorted(ids, labels)]  # [Z]


def _fill_empty_clusters(labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """Make all num_clusters clusters non-empty (k-means leaves some empty when F has fewer distinct rows than D,
    e.g. experts with identical router columns): the largest cluster (lowest id on ties) gives its last member a
    new cluster, until D clusters exist. Deterministic; a no-op in the usual case."""
    labels = labels.copy()
    while len(np.unique(labels)) < num_clusters:
        counts = np.bincount(labels, minlength=num_clusters)  # [D]
        donor = int(np.argmax(counts))
        labels[np.flatnonzero(labels == donor)[-1]] = int(np.flatnonzero(counts == 0)[0])
    return labels


def kmeans_labels(F: np.ndarray, num_clusters: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Canonical k-means labels [Z] in 0..D-1 for the rows of F [Z, D]; always exactly D non-empty clusters."""
    Z = F.shape[0]
    num_clusters = _check_num_clusters(num_clusters, Z)
    if num_clusters == 1:
        return np.zeros(Z, dtype=np.int64)
    if num_clusters == Z:
        return np.arange(Z, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate rows: handled by _fill_empty_clusters
        raw = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed).fit_predict(F)  # [Z]
    return canonical_labels(_fill_empty_clusters(canonical_labels(raw), num_clusters))


def spectral_clusters(
    S: torch.Tensor | np.ndarray, num_clusters: int, seed: int = 0, n_init: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """(labels [Z] int64 in 0..D-1, F [Z, D]): NJW spectral clustering of experts with similarity S.

    D == Z puts every expert in its own cluster (labels = arange(Z)); D == 1 puts all in cluster 0.
    """
    F, _ = spectral_embedding(S, num_clusters)  # [Z, D]
    return kmeans_labels(F, num_clusters, seed=seed, n_init=n_init), F


def eigengap(eigenvalues: np.ndarray, D: int) -> float:
    """lambda_{D+1} - lambda_D (1-based, eigenvalues sorted ascending); nan for D == Z (no lambda_{Z+1})."""
    ev = np.sort(np.asarray(eigenvalues, dtype=np.float64))  # [Z]
    D = _check_num_clusters(D, len(ev))
    return float("nan") if D == len(ev) else float(ev[D] - ev[D - 1])


def suggest_num_clusters(eigenvalues: np.ndarray, max_d: int, min_d: int = 2) -> int:
    """The D in min_d..min(max_d, Z-1) with the largest eigengap (smallest D on ties).

    min_d defaults to 2: S from `router_similarity` is >= 0 everywhere (unrelated experts sit at 0.5), so the graph is
    connected and lambda_2 - lambda_1 is usually the largest gap of all, which would always suggest D = 1.
    Returns min_d when the range is empty (Z <= min_d).
    """
    ev = np.sort(np.asarray(eigenvalues, dtype=np.float64))  # [Z]
    if ev.ndim != 1 or len(ev) < 1:
        raise ValueError(f"eigenvalues must be a non-empty 1-D array, got shape {ev.shape}")
    if min_d < 1:
        raise ValueError(f"min_d must be >= 1, got {min_d}")
    if max_d < min_d:
        raise ValueError(f"max_d must be >= min_d = {min_d}, got {max_d}")
    top = min(int(max_d), len(ev) - 1)
    if top < min_d:
        return int(min_d)
    gaps = np.diff(ev)[min_d - 1 : top]  # [top - min_d + 1], gaps[k] = lambda_{min_d+k+1} - lambda_{min_d+k}
    return int(np.argmax(gaps)) + int(min_d)


def cluster_silhouette(F: np.ndarray, labels: np.ndarray) -> float:
    """sklearn silhouette score of the clustering on the embedding F [Z, D]; nan unless 2 <= #clusters < Z."""
    F, labels = np.asarray(F), np.asarray(labels)
    if F.ndim != 2 or F.shape[0] != labels.shape[0]:
        raise ValueError(f"F [Z, D] and labels [Z] disagree: shapes {F.shape} and {labels.shape}")
    k = len(np.unique(labels))
    return float(silhouette_score(F, labels)) if 2 <= k < F.shape[0] else float("nan")
