"""Expert similarity from router logits (UNCURL Algorithm 1, lines 2-4).

    S[i, j] = (1 + cos(H[:, i], H[:, j])) / 2,   H [N, Z] router logits of one MoE layer

computed from one matrix product in float64 (G = H^T H) instead of the paper's loop over expert pairs.

Conventions shared by every function here:
- Input kind is kept: a torch tensor gives a torch float64 tensor, an ndarray gives a float64 ndarray.
- An all-zero logit column (an expert whose router row is zero) has no direction: its cosine is defined as 0 with
  every other expert (S = 0.5) and 1 with itself (S = 1).
- S is exactly symmetric, its diagonal is exactly 1 and every entry is clipped to [0, 1], whatever the rounding.
"""

from __future__ import annotations

import numpy as np
import torch

Array = torch.Tensor | np.ndarray


def _to_float64(x: Array, name: str) -> torch.Tensor:
    """A float64 torch view/copy of a tensor or ndarray (CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float64))
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _like_input(S: torch.Tensor, x: Array) -> Array:
    """Return S as the same kind (tensor / ndarray) as the caller's input x."""
    return S.numpy() if isinstance(x, np.ndarray) else S


def _check_logits(H: torch.Tensor) -> None:
    if H.ndim != 2:
        raise ValueError(f"router logits H must be 2-D [N tokens, Z experts], got shape {tuple(H.shape)}")
    if H.shape[0] < 1 or H.shape[1] < 1:
        raise ValueError(f"router logits H must have at least one token and one expert, got shape {tuple(H.shape)}")


def _check_finite(summary: torch.Tensor) -> None:
    """NaN/Inf anywhere in H reaches the Gram matrix H^T H, so checking [Z, Z] saves a pass over [N, Z]."""
    if not torch.isfinite(summary).all():
        raise ValueError("router logits H contain NaN or Inf (or overflow float64)")


def _gram(H: Array) -> torch.Tensor:
    """G [Z, Z] = H^T H in float64: the one matrix product over tokens."""
    Ht = _to_float64(H, "H")  # [N, Z]
    _check_logits(Ht)
    G = Ht.T @ Ht  # [Z, Z]
    _check_finite(G)
    return G


def _cosine_from_gram(G: torch.Tensor) -> torch.Tensor:
    """cos [Z, Z] = G_ij / sqrt(G_ii G_jj); a zero diagonal entry (zero column) gives cos 0 off the diagonal."""
    scale = torch.sqrt(torch.diagonal(G))  # [Z], column norms
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # [Z], avoids 0/0 for zero columns
    inv = torch.where(scale > 0, 1.0 / safe, torch.zeros_like(scale))  # [Z]
    return inv[:, None] * G * inv[None, :]  # [Z, Z]


def _similarity_from_cosine(cos: torch.Tensor) -> torch.Tensor:
    """S = (1 + cos) / 2, exactly symmetric (a blocked GEMM's H^T H need not be), diagonal 1, entries in [0, 1]."""
    cos = (cos + cos.T) / 2.0  # [Z, Z]
    S = (1.0 + cos.clamp(-1.0, 1.0)) / 2.0  # [Z, Z]
    S.fill_diagonal_(1.0)
    return S


def router_gram(H: Array) -> Array:
    """G = H^T H in float64 [Z, Z]; sum it over calibration batches and pass the total to `similarity_from_gram`."""
    return _like_input(_gram(H), H)


def router_similarity(H: Array) -> Array:
    """S [Z, Z] = (1 + cos(H[:, i], H[:, j])) / 2 for router logits H [N, Z], with one float64 matrix product.

    The product is G = H^T H; the column norms are sqrt(diag G), so normalising G on the [Z, Z] side equals
    normalising H's columns first without writing a second [N, Z] array. Returns a float64 tensor for tensor input
    and a float64 ndarray for ndarray input. Zero columns: see module doc.
    """
    return _like_input(_similarity_from_cosine(_cosine_from_gram(_gram(H))), H)


def similarity_from_gram(G: Array) -> Array:
    """S [Z, Z] from an accumulated Gram matrix G = H^T H [Z, Z]: S = (1 + G_ij / sqrt(G_ii G_jj)) / 2.

    Lets calibration keep O(Z^2) memory: accumulate `router_gram(H_batch)` over batches in float64, then call this.
    Equal to `router_similarity(H)` for the concatenated H up to rounding. Zero diagonal entries (zero columns) follow
    the module's zero-column convention.
    """
    Gt = _to_float64(G, "G")  # [Z, Z]
    if Gt.ndim != 2 or Gt.shape[0] != Gt.shape[1] or Gt.shape[0] < 1:
        raise ValueError(f"Gram matrix G must be square [Z, Z], got shape {tuple(Gt.shape)}")
    if not torch.isfinite(Gt).all():
        raise ValueError("Gram matrix G contains NaN or Inf")
    if (torch.diagonal(Gt) < 0).any():
        raise ValueError("Gram matrix G has a negative diagonal entry; it is not H^T H")
    return _like_input(_similarity_from_cosine(_cosine_from_gram(Gt)), G)


def router_similarity_loop(H: Array) -> Array:
    """Reference: the paper's loop over expert pairs (Algorithm 1, lines 2-5). For tests and benchmarks only.

    Same conventions and return kind as `router_similarity`; one dot product and two norms per pair.
    """
    Ht = _to_float64(H, "H")  # [N, Z]
    _check_logits(Ht)
    _check_finite(Ht)
    cols = np.ascontiguousarray(Ht.numpy().T)  # [Z, N], each expert's logit column contiguous
    Z = cols.shape[0]
    S = np.empty((Z, Z), dtype=np.float64)
    for i in range(Z):
        S[i, i] = 1.0
        for j in range(i + 1, Z):
            ni, nj = np.linalg.norm(cols[i]), np.linalg.norm(cols[j])
            cos = float(np.dot(cols[i], cols[j]) / (ni * nj)) if ni > 0 and nj > 0 else 0.0
            S[i, j] = S[j, i] = (1.0 + min(1.0, max(-1.0, cos))) / 2.0
    return S if isinstance(H, np.ndarray) else torch.from_numpy(S)
