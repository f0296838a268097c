"""The deterministic sample plan of a built corpus (`smoe-lab data build`), and the loader the trainers read it with.

Every global sample index g (0, 1, 2, ...) maps to one training window, a pure function of (seed, weights,
block size T, the corpus's shards): nothing is stored, nothing depends on the number of ranks or on when a run
was interrupted.

    g -> source:  a fixed interleave of CYCLE = 65,536 slots in which source s holds q_s = round(CYCLE * w_s) slots,
                  spread evenly (stride scheduling: the k-th slot of s sits near (k + 1/2) / q_s of the cycle), so
                  every stretch of samples, one global batch included, has each source within one sample of its
                  share; k = the source's own sample count before g
    k -> window:  epoch e = k // W_s, i = k % W_s over the source's W_s windows; a seeded pseudo-random
                  permutation of [0, W_s) per (seed, source, epoch) (a Feistel bijection: O(1) memory, random
                  access), so each epoch sees every window once, in a new order
    window -> (shard, offset): windows are T-token strides of each shard's used prefix, w-th window of a shard
                  starting at w * T and reading T + 1 tokens (x and the shifted targets); none crosses a shard

Data parallel: global batch t is samples [t * B, (t + 1) * B). Micro-step m of rank r out of R reads samples
t * B + m * R * b + r * b + [0, b) (micro batch b), so the ranks of a step read disjoint samples that together are
the global batch, and a step's batch is the same for any R. The trainer checkpoints the consumed-sample count
(`PlanLoader.state_dict`); resuming continues with exactly the next samples, also on another number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CYCLE = 1 << 16
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ROUNDS = 4


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------------------


def _splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def seed_key(*parts: int) -> int:
    """A 64-bit key from integers (seeds, indices), through numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def permute(i: np.ndarray, n: int, key: int) -> np.ndarray:
    """A seeded bijection of [0, n) applied to i [m] (int64): a 4-round balanced Feistel network on the smallest
    even number of bits that covers n, with cycle walking (re-apply until the value falls below n)."""
    if n <= 1:
        return np.zeros_like(np.asarray(i, dtype=np.int64))
    half = max(1, math.ceil(math.log2(n) / 2))
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = [np.uint64(k) for k in _splitmix(np.array([(key + r) % 2**64 for r in range(_ROUNDS)], dtype=np.uint64))]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_splitmix(right ^ k) & mask)
        return (left << shift) | right

    x = np.asarray(i, dtype=np.int64).astype(np.uint64)
    out = feistel(x)
    todo = out >= np.uint64(n)
    while todo.any():
        out[todo] = feistel(out[todo])
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


def quotas(weights: Sequence[float], cycle: int = CYCLE) -> np.ndarray:
    """Slots per source in one cycle: cycle * w rounded by largest remainder (each >= 1), summing to cycle."""
    w = np.asarray(weights, dtype=np.float64)
    exact = cycle * w / w.sum()
    q = np.maximum(np.floor(exact).astype(np.int64), 1)
    while q.sum() > cycle:  # only when many tiny weights were lifted to 1
        q[np.argmax(q)] -= 1
    order = np.argsort(-(exact - q), kind="stable")
    q[order[: cycle - int(q.sum())]] += 1
    return q


def interleave(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source [C], rank [C]) of each slot of a cycle: source s's k-th slot at ideal position (k + 1/2) / q_s;
    every prefix holds each source within one slot of its share."""
    src = np.concatenate([np.full(n, s, dtype=np.int64) for s, n in enumerate(q)])
    rank = np.concatenate([np.arange(n, dtype=np.int64) for n in q])
    pos = (rank + 0.5) / np.repeat(q, q)
    order = np.lexsort((src, pos))  # by ideal position, ties by source index
    return src[order], rank[order]


# ---------------------------------------------------------------------------------------------------------------
# Shards of a built corpus
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceShards:
    """One source's train shards: files and the tokens used of each (its share cut at the end)."""

    name: str
    files: tuple[Path, ...]
    used: tuple[int, ...]


def corpus_shards(path: str | Path, meta: Mapping) -> list[SourceShards]:
    """The train shards of a built corpus, sources in meta order."""
    shards = meta.get("shards")
    if not shards:
        raise ValueError(f"corpus {path} has no train shards (not made by `smoe-lab data build`)")
    root = Path(path)
    return [
        SourceShards(name, tuple(root / s["file"] for s in shards[name]), tuple(int(s["used"]) for s in shards[name]))
        for name in meta["domains"]
    ]


class _Shards:
    """Lazily memory-mapped shard files (read-only, little-endian uint16)."""

    def __init__(self, dtype: str = "uint16"):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.maps: dict[Path, np.memmap] = {}

    def get(self, path: Path, used: int) -> np.memmap:
        m = self.maps.get(path)
        if m is None:
            if not path.is_file():
                raise FileNotFoundError(f"corpus shard not found: {path}")
            size = path.stat().st_size // self.dtype.itemsize
            if size < used:
                raise ValueError(f"corpus shard {path} holds {size} tokens, meta.json uses {used}")
            m = self.maps[path] = np.memmap(path, dtype=self.dtype, mode="r", shape=(size,))
        return m


class ShardedStream:
    """The train split of a built corpus as one read-only token stream (the used prefix of every shard, sources
    in order): `len`, slices and integer-array indexing like the flat `train.bin` of a recipe corpus, so
    `get_batch`, `iter_eval_batches` and stage-1 LM mixing read it unchanged."""

    def __init__(self, sources: Sequence[SourceShards], dtype: str = "uint16"):
        self.files = [f for s in sources for f in s.files]
        self.used = np.array([u for s in sources for u in s.used], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.used)])
        self._shards = _Shards(dtype)
        self.dtype = self._shards.dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def _gather(self, pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError(f"index out of range for a stream of {len(self)} tokens")
        shard = np.searchsorted(self.starts, pos, side="right") - 1
        out = np.empty(pos.shape, dtype=self.dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._shards.get(self.files[s], int(self.used[s]))[pos[sel] - self.starts[s]]
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._gather(np.arange(*key.indices(len(self))))
        if isinstance(key, (int, np.integer)):
            k = int(key) + (len(self) if key < 0 else 0)
            return self._gather(np.array([k]))[0]
        return self._gather(key)

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


class SamplePlan:
    """Global sample index -> (source, shard, offset) -> window [T + 1] (see the module docstring)."""

    def __init__(
        self,
        sources: Sequence[SourceShards],
        weights: Sequence[float],
        block_size: int,
        seed: int | Sequence[int] = 0,
        dtype: str = "uint16",
    ):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"SamplePlan: block_size must be an integer >= 1, got {block_size!r}")
        if len(weights) != len(sources) or not sources:
            raise ValueError(f"SamplePlan: {len(weights)} weights for {len(sources)} sources")
        if any(not np.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"SamplePlan: weights must be positive, got {list(weights)}")
        self.sources = list(sources)
        self.block_size = block_size
        self.seed = tuple(int(s) for s in (seed if isinstance(seed, (list, tuple)) else [seed]))
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self._shards = _Shards(dtype)
        # windows [n_shards] per source: T-strides of the used prefix, each reading T + 1 tokens
        self.windows = [np.maximum((np.asarray(s.used, dtype=np.int64) - 1) // block_size, 0) for s in self.sources]
        self.window_starts = [np.concatenate([[0], np.cumsum(w)]) for w in self.windows]
        self.total_windows = np.array([int(ws[-1]) for ws in self.window_starts], dtype=np.int64)
        for s, n in zip(self.sources, self.total_windows):
            if n == 0:
                raise ValueError(
                    f"SamplePlan: source {s.name!r} has no shard of more than block_size {block_size} tokens"
                )
        self.quotas = quotas(self.weights)
        self.slot_source, self.slot_rank = interleave(self.quotas)
        self._key = seed_key(*self.seed)

    @classmethod
    def from_corpus(cls, corpus, block_size: int | None = None, seed: int | Sequence[int] | None = None):
        """The plan of a built corpus (`smoe_lab.data.corpus.Corpus` of a `smoe-lab data build` folder): its
        weights, and seed (corpus seed, `seed`) — so the corpus's --seed and the training seed both change the order."""
        meta = corpus.meta
        sources = corpus_shards(corpus.path, meta)
        weights = [float(meta["weights"][s.name]) for s in sources]
        base = int(meta.get("seed", 0))
        run = [] if seed is None else list(seed) if isinstance(seed, (list, tuple)) else [int(seed)]
        return cls(sources, weights, block_size or int(meta["block_size"]), seed=[base, *run], dtype=meta["dtype"])

    # -- the mapping -----------------------------------------------------------------------------------------
    def source_of(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source [n], the source's own sample number k [n]) of global sample indices g [n]."""
        g = np.asarray(g, dtype=np.int64)
        if g.size and g.min() < 0:
            raise ValueError("sample indices must be >= 0")
        cycle, slot = np.divmod(g, CYCLE)
        src = self.slot_source[slot]
        return src, cycle * self.quotas[src] + self.slot_rank[slot]

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source [n], shard [n], token offset in the shard [n]) of global sample indices g [n]."""
        src, k = self.source_of(g)
        shard = np.empty_like(k)
        offset = np.empty_like(k)
        for s in np.unique(src):
            sel = src == s
            n = int(self.total_windows[s])
            epoch, i = np.divmod(k[sel], n)
            win = np.empty_like(i)
            for e in np.unique(epoch):  # one permutation per (seed, source, epoch)
                at = epoch == e
                win[at] = permute(i[at], n, seed_key(self._key, int(s), int(e)))
            sh = np.searchsorted(self.window_starts[s], win, side="right") - 1
            shard[sel] = sh
            offset[sel] = (win - self.window_starts[s][sh]) * self.block_size
        return src, shard, offset

    def windows_of(self, g: np.ndarray) -> np.ndarray:
        """Token windows [n, T + 1] (int64) of global sample indices g [n]."""
        src, shard, offset = self.locate(g)
        out = np.empty((len(src), self.block_size + 1), dtype=np.int64)
        for j, (s, sh, off) in enumerate(zip(src, shard, offset)):
            m = self._shards.get(self.sources[s].files[sh], self.sources[s].used[sh])
            out[j] = m[off : off + self.block_size + 1]
        return out

    def batch(self, g: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors [n, T] of samples g: y[:, t] = x[:, t + 1]."""
        w = torch.from_numpy(self.windows_of(g))
        return w[:, :-1], w[:, 1:]

    def fingerprint(self) -> str:
        """Identifies the mapping: seed, block size, weights and the shards (files, tokens used)."""
        doc = {
            "seed": list(self.seed),
            "block_size": self.block_size,
            "cycle": CYCLE,
            "weights": [round(float(w), 12) for w in self.weights],
            "sources": [[s.name, [f.name for f in s.files], list(s.used)] for s in self.sources],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


class PlanLoader:
    """The trainers' view of a SamplePlan: `next_batch()` (also `loader()`) gives this rank's next micro-batch
    (x, y, None) [b, T]; `state_dict()` / `load_state_dict()` hold the consumed-sample count, which the trainers
    save in their checkpoint's train state. `rank_aware`: the DeepSpeed engine calls it once per micro-step (it
    reads only this rank's samples) after `set_rank(rank, world_size)`."""

    rank_aware = True

    def __init__(self, plan: SamplePlan, micro_batch_size: int, rank: int = 0, world_size: int = 1):
        if micro_batch_size < 1:
            raise ValueError(f"PlanLoader: micro_batch_size must be >= 1, got {micro_batch_size}")
        self.plan = plan
        self.micro_batch_size = micro_batch_size
        self.consumed = 0
        self.set_rank(rank, world_size)

    def set_rank(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"PlanLoader: rank {rank} outside a world of {world_size}")
        self.rank, self.world_size = rank, world_size
        self._check_alignment()

    def _check_alignment(self) -> None:
        step = self.micro_batch_size * self.world_size
        if self.consumed % step:
            raise ValueError(
                f"PlanLoader: {self.consumed} consumed samples is not a multiple of micro_batch_size x world_size = "
                f"{step}: resume at a global batch boundary (same global batch size)"
            )

    def indices(self) -> np.ndarray:
        """Global sample indices [b] of this rank's next micro-batch."""
        b = self.micro_batch_size
        return self.consumed + self.rank * b + np.arange(b, dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, y = self.plan.batch(self.indices())
        self.consumed += self.micro_batch_size * self.world_size
        return x, y, None

    __call__ = next_batch

    def state_dict(self) -> dict:
        return {"consumed_samples": int(self.consumed), "plan": self.plan.fingerprint()}

    def load_state_dict(self, state: Mapping | None) -> None:
        if state is None:
            raise ValueError("resume: the checkpoint holds no sample-plan state (it was not trained on a built corpus)")
        if state.get("plan") != self.plan.fingerprint():
            raise ValueError(
                f"resume: the checkpoint's sample plan {state.get('plan')} is not this corpus's plan "
                f"{self.plan.fingerprint()} (other corpus, seed, weights or block size)"
            )
        self.consumed = int(state["consumed_samples"])
        self._check_alignment()
