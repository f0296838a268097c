"""Splitting a domain's documents and packing token lists into one stream (pure functions of their inputs).

Used by `smoe_lab.data.corpus` when it builds a prepared corpus: documents are cleaned, split by document per domain
with a seeded shuffle (held-out first, then val and train), and every split is packed GPT-2 style (each document
followed by <|endoftext|>, no padding).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from smoe_lab.data.tokenizer import EOT_TOKEN


def clean_document(text: str) -> str:
    """Strip surrounding whitespace and any literal <|endoftext|> (it would fake a document boundary)."""
    return text.replace(EOT_TOKEN, "").strip()


def domain_rng(seed: int, domain: str) -> np.random.Generator:
    """A generator that depends only on (seed, domain name): adding a domain does not reshuffle the others."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))])


@dataclass
class DomainSplit:
    """Documents of one domain by split, plus how many were left out by the size cap."""

    train: list[str]
    val: list[str]
    heldout: list[str]
    available: int
    dropped_by_cap: int = 0


def split_documents(
    docs: Sequence[str],
    val_fraction: float,
    heldout_docs: int,
    max_chars: float | None,
    rng: np.random.Generator,
    domain: str = "?",
) -> DomainSplit:
    """Shuffle one domain's documents and split them into heldout / val / train.

    heldout: the first min(heldout_docs, n // 10) shuffled documents (never more than a tenth of a domain).
    The rest, in shuffled order, are kept while their total characters stay within `max_chars` (None: all), then
    val gets max(1, round(val_fraction * kept)) documents and train the remainder. Disjoint by construction.
    """
    n = len(docs)
    order = rng.permutation(n)
    n_held = min(heldout_docs, n // 10)
    held, rest = order[:n_held], order[n_held:]
    if max_chars is not None:
        lengths = np.fromiter((len(docs[i]) for i in rest), dtype=np.int64, count=len(rest))
        n_keep = max(int(np.searchsorted(np.cumsum(lengths), max_chars, side="right")), min(2, len(rest)))
        kept = rest[:n_keep]
    else:
        kept = rest
    n_val = max(1, round(val_fraction * len(kept)))
    if len(kept) - n_val < 1:
        raise ValueError(f"domain {domain!r} has too few documents ({n}) for heldout + val + train splits")
    return DomainSplit(
        train=[docs[i] for i in kept[n_val:]],
        val=[docs[i] for i in kept[:n_val]],
        heldout=[docs[i] for i in held],
        available=n,
        dropped_by_cap=len(rest) - len(kept),
    )


def token_dtype(vocab_size: int) -> np.dtype:
    """np.uint16 when every id fits in 16 bits (vocab <= 65,536), else np.uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def pack(token_lists: Iterable[Sequence[int]], eot_id: int, dtype: np.dtype) -> np.ndarray:
    """One flat stream [sum(len(doc) + 1)]: each document's ids followed by eot_id."""
    parts = []
    for ids in token_lists:
        parts.append(np.asarray(ids, dtype=dtype))
        parts.append(np.asarray([eot_id], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
