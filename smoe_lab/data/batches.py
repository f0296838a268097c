"""Training and evaluation batches drawn from a flat token stream (a prepared corpus split).

Training windows start at offsets drawn from a torch.Generator (same state, same batch); evaluation windows are
fixed, non-overlapping and in stream order, so every evaluation of a stream sees the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # buf [B, T+1] int64; x = buf[:, :-1], y = buf[:, 1:]
    buf = np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)
    t = torch.from_numpy(buf)
    return t[:, :-1], t[:, 1:]


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random training batch: x, y LongTensors [B, T] with y[:, t] = x[:, t + 1] (next-token targets).

    Window starts are drawn uniformly from [0, N - T - 1] with `generator`, so the same generator state gives the
    same batch. Windows are contiguous stretches of the packed stream and may cross documents (eot between them).
    """
    n = len(tokens)
    if n < block_size + 1:
        raise ValueError(
            f"token stream of {n} tokens is too short for block_size {block_size} (needs {block_size + 1})"
        )
    starts = torch.randint(n - block_size, (batch_size,), generator=generator).numpy()  # [B]
    x, y = _windows(tokens, starts, block_size)
    if device is not None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x, y


def eval_window_starts(n_tokens: int, batch_size: int, block_size: int, max_batches: int | None = None) -> np.ndarray:
    """Start offsets [W] of the evaluation windows of a stream of n_tokens.

    The stream holds (n_tokens - 1) // T non-overlapping windows. All of them are used when max_batches is None;
    otherwise max_batches * B of them, spread evenly over the whole stream (so a capped evaluation still sees
    every part, hence every domain, of it). Same inputs, same windows, same order.
    """
    total = (n_tokens - 1) // block_size
    if total < 1:
        raise ValueError(f"token stream of {n_tokens} tokens is too short for block_size {block_size}")
    count = total if max_batches is None else min(total, max_batches * batch_size)
    return (np.arange(count, dtype=np.int64) * total // count) * block_size


def iter_eval_batches(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches (x, y) [B, T] over non-overlapping windows (see `eval_window_starts`).

    Fixed composition: every call yields the same windows in the same order; the last batch may be smaller.
    """
    starts = eval_window_starts(len(tokens), batch_size, block_size, max_batches)
    for i in range(0, len(starts), batch_size):
        x, y = _windows(tokens, starts[i : i + batch_size], block_size)
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x, y
