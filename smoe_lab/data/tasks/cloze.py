"""Cloze tasks ("cloze-<domain>") built from a prepared corpus's held-out documents.

A CPU-sized model can learn them, they are domain-specific, and they never touch pretraining text: the held-out
documents are in neither the train nor the val split of the corpus.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from smoe_lab.data.tasks.example import SPLITS, Example, as_choice

CLOZE_PREFIX = "cloze-"
CLOZE_DEFAULT_N = 1000
_ANSWER_WORD = re.compile(r"[a-z]{3,}")


def cloze_documents(corpus, domain: str, split: str) -> list[tuple[int, str]]:
    """(document number, text) of one half of a domain's held-out documents.

    The halves come from a permutation seeded by the domain name only (never by the task seed), so "train" and
    "validation" are disjoint by document whatever seed the examples are drawn with.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    docs = corpus.heldout(domain)
    if len(docs) < 2:
        raise ValueError(f"domain {domain!r} has {len(docs)} held-out documents; a cloze task needs at least 2")
    order = np.random.default_rng(zlib.crc32(f"cloze:{domain}".encode())).permutation(len(docs))
    half = len(docs) // 2
    chosen = np.sort(order[:half] if split == "train" else order[half:])
    return [(int(i), docs[i]) for i in chosen]


def _cloze_items(doc_no: int, text: str, min_context: int, num_choices: int) -> tuple[list[tuple], list[str]]:
    """Candidate (doc_no, word number) positions of one document and its distinct answer-like words."""
    words = [(m.group(), m.start()) for m in re.finditer(r"\S+", text)]
    vocab = list(dict.fromkeys(w for w, _ in words if _ANSWER_WORD.fullmatch(w)))
    if len(vocab) < num_choices:
        return [], vocab
    spots = [(doc_no, i) for i, (w, _) in enumerate(words) if i >= min_context and _ANSWER_WORD.fullmatch(w)]
    return spots, vocab


def cloze_task(
    corpus,
    domain: str,
    n: int = CLOZE_DEFAULT_N,
    num_choices: int = 4,
    seed: int = 0,
    split: str = "validation",
    context_words: int = 32,
    min_context_words: int = 8,
) -> list[Example]:
    """A next-word cloze task from one half of a domain's held-out documents (see `cloze_documents`).

    Each item: the `context_words` words before a lowercase word of >= 3 letters (at least `min_context_words` of
    them) as input; that word as the answer; `num_choices - 1` distractors drawn from the other distinct such words
    of the SAME document (in-domain, plausible); choices in a seeded random order. Positions are drawn without
    replacement over the whole half, so there are min(n, positions available) items. Deterministic in
    (corpus, domain, split, seed). idx is "<domain>/<document number>:<word number>".
    """
    if num_choices < 2:
        raise ValueError(f"num_choices must be >= 2, got {num_choices}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    docs = dict(cloze_documents(corpus, domain, split))
    spots, vocabs = [], {}
    for doc_no, text in docs.items():
        s, vocabs[doc_no] = _cloze_items(doc_no, text, min_context_words, num_choices)
        spots.extend(s)
    if not spots:
        raise ValueError(f"domain {domain!r} ({split}) has no document with {num_choices} distinct answer words")
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode()), SPLITS.index(split)])
    picks = rng.choice(len(spots), size=min(n, len(spots)), replace=False)
    out = []
    for p in np.sort(picks):
        doc_no, i = spots[p]
        text = docs[doc_no]
        words = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        answer = words[i][0]
        start = words[max(0, i - context_words)][1]
        context = text[start : words[i - 1][2]]
        others = [w for w in vocabs[doc_no] if w != answer]
        distractors = [others[j] for j in rng.choice(len(others), size=num_choices - 1, replace=False)]
        choices = [answer, *distractors]
        order = rng.permutation(num_choices)
        out.append(
            Example(
                f"{CLOZE_PREFIX}{domain}",
                f"{domain}/{doc_no}:{i}",
                " ".join(context.split()),
                [as_choice(choices[k]) for k in order],
                int(np.flatnonzero(order == 0)[0]),
            )
        )
    return out
