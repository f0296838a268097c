"""`smoe-lab data build`'s settings: the format constants, parsing of --tokens / --source / --weights, per-source
token budgets, the resolved sources. Re-exported by smoe_lab.data.build (see its docstring for the layout)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smoe_lab.data import readers
from smoe_lab.data.tokenizer import GPT2_SHA256, GPT2_VOCAB_SIZE

BUILD_FORMAT = "smoe-lab-shards"


BUILD_VERSION = 1


DTYPE = np.dtype("<u2")  # GPT-2 ids < 65,536


EOT_ID = GPT2_VOCAB_SIZE - 1


DEFAULT_SHARD_TOKENS = 1 << 27  # ~134M tokens (256 MiB) per shard


DEFAULT_VAL_TOKENS = 10_000_000


BATCH_CHARS = 1 << 20  # documents are tokenized in batches of ~1M characters


TOKENIZER_DIR = "tokenizer"


LOCK = ".build.lock"


# Tokens per input byte, to guess how many files a source needs before any is finished (then measured).
DEFAULT_TOKENS_PER_BYTE = {"gzip": 0.5, "xz": 0.8, None: 0.22}


KNOWN_LICENCES = {
    "c4": "ODC-BY 1.0 (allenai/c4; also bound by the Common Crawl terms of use)",
    "mc4": "ODC-BY 1.0 (allenai/c4 en-multi, mC4 English; also bound by the Common Crawl terms of use)",
    "cc100": "unknown: Common Crawl text (CC-100, statmt.org/cc-100); the Common Crawl terms of use apply",
}


SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str | int, what: str = "count") -> int:
    """An integer from '40000000000', '40B', '10M', '2.5k' or '4e10'."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    mult = 1
    if s and s[-1] in SUFFIXES:
        s, mult = s[:-1], SUFFIXES[s[-1]]
    try:
        value = float(s) * mult
    except ValueError:
        raise ValueError(f"{what}: not a number: {text!r} (use e.g. 40000000000, 40B, 10M)") from None
    if value != int(value):
        raise ValueError(f"{what}: not a whole number of tokens: {text!r}")
    return int(value)


def parse_sources(pairs: Sequence[str]) -> dict[str, list[str]]:
    """['cc100=/d/en.txt.xz', 'mc4=/d/c4-en.*.json.gz', 'mc4=more/*.json.gz'] -> {name: [patterns]} in order."""
    out: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, pattern = pair.partition("=")
        name = name.strip()
        if not sep or not name or not pattern:
            raise ValueError(f"--source expects NAME=PATH_OR_GLOB, got {pair!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"--source name {name!r}: use letters, digits, '_', '-', '.' (it names a folder)")
        out.setdefault(name, []).append(pattern)
    if not out:
        raise ValueError("no --source given: pass at least one NAME=PATH_OR_GLOB")
    return out


def parse_weights(text: str | Mapping[str, float] | None, names: Sequence[str]) -> dict[str, float]:
    """'cc100=1,mc4=3' (or a mapping) -> {name: weight / sum}; None -> equal weights."""
    if text is None:
        raw = {n: 1.0 for n in names}
    elif isinstance(text, Mapping):
        raw = {str(k): float(v) for k, v in text.items()}
    else:
        raw = {}
        for item in str(text).split(","):
            name, sep, w = item.partition("=")
            if not sep:
                raise ValueError(f"--weights expects NAME=W,NAME=W, got {text!r}")
            try:
                raw[name.strip()] = float(w)
            except ValueError:
                raise ValueError(f"--weights: weight of {name.strip()!r} is not a number: {w!r}") from None
    unknown, missing = sorted(set(raw) - set(names)), [n for n in names if n not in raw]
    if unknown:
        raise ValueError(f"--weights names unknown source(s) {unknown}; sources: {', '.join(names)}")
    if missing:
        raise ValueError(f"--weights gives no weight for source(s) {missing}")
    if any(not np.isfinite(w) or w <= 0 for w in raw.values()):
        raise ValueError(f"--weights must all be positive numbers, got {raw}")
    total = sum(raw.values())
    return {n: raw[n] / total for n in names}


def budgets(tokens: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Train tokens per source: the share of `tokens` by weight, rounded so that they sum to `tokens`."""
    names = list(weights)
    exact = np.array([tokens * weights[n] for n in names])
    base = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - base), kind="stable")  # largest remainders get the leftover tokens
    base[order[: tokens - int(base.sum())]] += 1
    return {n: int(b) for n, b in zip(names, base)}


@dataclass
class Source:
    name: str
    patterns: list[str]
    files: list[str]
    weight: float
    budget: int
    licence: str

    @property
    def dir(self) -> str:
        return self.name


@dataclass
class Settings:
    """What a shard's content depends on (besides its input file): a rerun must match these exactly."""

    builder: str = f"{BUILD_FORMAT}/{BUILD_VERSION}"
    tokenizer: str = "gpt2 encoder.json:{} vocab.bpe:{}".format(GPT2_SHA256["encoder.json"], GPT2_SHA256["vocab.bpe"])
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_tokens: int = DEFAULT_VAL_TOKENS
    text_field: str = "text"


def resolve_sources(
    patterns: Mapping[str, Sequence[str]], weights: Mapping[str, float], tokens: int, licences: Mapping[str, str]
) -> list[Source]:
    """Expand every source's patterns to files (sorted per pattern, duplicates dropped) and check them all before
    anything is written: a name without files, a missing file or an unknown format is one error."""
    share = budgets(tokens, weights)
    out = []
    for name, pats in patterns.items():
        files: list[str] = []
        for pat in pats:
            found = readers.expand(pat)
            if not found and any(c in pat for c in "*?["):
                raise ValueError(f"source {name!r}: no files match {pat!r}")
            for f in found:
                if not readers.is_remote(f) and not Path(f).is_file():
                    raise FileNotFoundError(f"source {name!r}: input file not found: {f}")
                readers.file_format(f)
                if f not in files:
                    files.append(f)
        if not files:
            raise ValueError(f"source {name!r} has no input files")
        licence = licences.get(name) or KNOWN_LICENCES.get(name.lower(), "not given (pass --licence NAME=TEXT)")
        out.append(Source(name, list(pats), files, weights[name], share[name], licence))
    return out
