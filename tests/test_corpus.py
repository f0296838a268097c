"""Corpus building (on small in-memory documents), reading, batches, and the prepared `tiny` corpus."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from smoe_lab.data import corpus as corpus_mod
from smoe_lab.data.corpus import (
    CHARS_PER_TOKEN,
    RECIPES,
    build_corpus_from_documents,
    eval_window_starts,
    get_batch,
    is_prepared,
    iter_eval_batches,
    open_corpus,
    prepare,
    split_documents,
)
from smoe_lab.data.tokenizer import ByteBPETokenizer, atomic_write_bytes

WORDS = {
    "alpha": "router expert token capacity gate merge cluster spectral layer frequency".split(),
    "beta": "thou art more lovely and temperate rough winds do shake the darling buds".split(),
    "gamma": "court plaintiff filed motion judge ruled appeal district order settlement".split(),
}


def make_documents(n_docs: int = 40) -> dict[str, list[str]]:
    """Distinct, deterministic documents per domain (each starts with its own id, so texts never repeat)."""
    rng = np.random.default_rng(123)
    docs = {}
    for name, words in WORDS.items():
        docs[name] = [
            f"{name} doc {i}. " + " ".join(rng.choice(words, size=int(rng.integers(20, 60)))) + "."
            for i in range(n_docs)
        ]
    return docs


BUILD = dict(tokenizer_spec="bpe-300", block_size=16, val_fraction=0.1, heldout_docs_per_domain=3, seed=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    docs = make_documents()
    meta = build_corpus_from_documents(out, docs, **BUILD, sources={"alpha": {"licence": "test"}})
    return out, docs, meta


def _split_stream(stream: np.ndarray, eot: int) -> list[list[int]]:
    """Documents of a packed stream: the id runs between eot tokens (every document ends with one)."""
    assert len(stream) == 0 or stream[-1] == eot
    docs, cur = [], []
    for t in stream.tolist():
        if t == eot:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


def test_meta_counts_and_dtype(built):
    out, docs, meta = built
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["block_size"] == 16 and meta["seed"] == 0
    assert meta["tokenizer"]["name"] == "bpe-300" and meta["tokenizer"]["eot_id"] == 0
    assert meta["domains"] == ["alpha", "beta", "gamma"]
    assert meta["sources"]["alpha"] == {"licence": "test"}
    for name in docs:
        d = meta["documents"][name]
        assert (d["available"], d["heldout"], d["val"], d["train"], d["dropped_by_cap"]) == (40, 3, 4, 33, 0)
    by_domain = meta["tokens_by_domain"]
    assert meta["tokens"]["train"] == sum(v["train"] for v in by_domain.values())
    assert meta["tokens"]["val"] == sum(v["val"] for v in by_domain.values())
    assert meta["blocks"]["train"] == (meta["tokens"]["train"] - 1) // 16
    # Files are raw uint16 streams of exactly the recorded length; no temp files are left behind.
    assert (out / "train.bin").stat().st_size == 2 * meta["tokens"]["train"]
    for name in docs:
        assert (out / f"val_{name}.bin").stat().st_size == 2 * by_domain[name]["val"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_streams_hold_exactly_the_split_documents(built):
    out, docs, meta = built
    c = open_corpus(out)
    tok = c.tokenizer
    train = {tok.decode(d) for d in _split_stream(np.asarray(c.split("train")), tok.eot_id)}
    val = {tok.decode(d) for d in _split_stream(np.asarray(c.split("val")), tok.eot_id)}
    heldout = {t for name in docs for t in c.heldout(name)}
    assert len(train) == sum(m["train"] for m in meta["documents"].values())
    assert len(val) == sum(m["val"] for m in meta["documents"].values())
    assert len(heldout) == 9
    assert not (train & val) and not (train & heldout) and not (val & heldout)
    assert train | val | heldout == {t for d in docs.values() for t in d}
    # val.bin is the union of the per-domain val streams, each holding only its own domain.
    for name in docs:
        per = {tok.decode(d) for d in _split_stream(np.asarray(c.split(f"val_{name}")), tok.eot_id)}
        assert per and all(t.startswith(f"{name} doc ") for t in per)
        assert per <= val
    assert len(c.split("val")) == sum(len(c.split(f"val_{n}")) for n in docs)


def test_tokenizer_trained_on_train_documents_only(tmp_path, monkeypatch):
    seen: list[str] = []
    original = ByteBPETokenizer.train.__func__

    def recording_train(cls, texts, vocab_size, min_frequency=2):
        texts = list(texts)
        seen.extend(texts)
        return original(cls, texts, vocab_size, min_frequency)

    monkeypatch.setattr(ByteBPETokenizer, "train", classmethod(recording_train))
    docs = make_documents()
    build_corpus_from_documents(tmp_path, docs, **BUILD)
    c = open_corpus(tmp_path)
    tok = c.tokenizer
    train = {tok.decode(d) for d in _split_stream(np.asarray(c.split("train")), tok.eot_id)}
    assert sorted(seen) == sorted(train)


def test_build_is_deterministic_and_seeded(built, tmp_path):
    _, docs, meta = built
    again = build_corpus_from_documents(tmp_path / "a", docs, **BUILD)
    assert again["sha256"] == meta["sha256"]
    other = build_corpus_from_documents(tmp_path / "b", docs, **(BUILD | {"seed": 1}))
    assert other["sha256"]["train.bin"] != meta["sha256"]["train.bin"]


def test_split_documents_cap_and_fractions():
    docs = [f"document number {i:03d} " * 5 for i in range(100)]  # 100 chars each
    rng = np.random.default_rng(0)
    s = split_documents(docs, val_fraction=0.05, heldout_docs=200, max_chars=20 * 100, rng=rng)
    assert len(s.heldout) == 10  # never more than a tenth of the domain
    assert len(s.train) + len(s.val) == 20 and len(s.val) == 1
    assert s.dropped_by_cap == 70
    assert sum(map(len, s.train + s.val)) <= 20 * 100
    assert len(set(s.train) | set(s.val) | set(s.heldout)) == 30  # disjoint: 19 + 1 + 10
    with pytest.raises(ValueError, match="too few documents"):
        split_documents(["only one"], 0.05, 0, None, np.random.default_rng(0), domain="x")


def test_cap_in_build(tmp_path):
    docs = make_documents(60)
    cap = 300  # tokens, applied as 300 * CHARS_PER_TOKEN characters per domain
    meta = build_corpus_from_documents(tmp_path, docs, **(BUILD | {"max_tokens_per_domain": cap}))
    for name, d in meta["documents"].items():
        assert d["dropped_by_cap"] > 0
        assert d["train"] + d["val"] + d["heldout"] + d["dropped_by_cap"] == 60
    assert meta["splitting"]["chars_per_token_cap"] == CHARS_PER_TOKEN


def test_failed_rebuild_leaves_no_meta(built, tmp_path, monkeypatch):
    out = tmp_path / "c"
    build_corpus_from_documents(out, make_documents(), **BUILD)
    before = (out / "train.bin").read_bytes()

    def broken(path, tokens):
        raise OSError("disk full")

    monkeypatch.setattr(corpus_mod, "write_tokens", broken)
    with pytest.raises(OSError, match="disk full"):
        build_corpus_from_documents(out, make_documents(), **(BUILD | {"seed": 5}))
    assert not (out / "meta.json").exists()  # incomplete corpus is not openable
    assert (out / "train.bin").read_bytes() == before  # and old files were never half-overwritten
    with pytest.raises(FileNotFoundError, match=r"meta not found: .*smoe-lab data prepare"):
        open_corpus(out)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    old_umask = os.umask(0o022)
    try:
        atomic_write_bytes(target, b"old")
    finally:
        os.umask(old_umask)
    assert target.stat().st_mode & 0o777 == 0o644  # like open(), not mkstemp's 0600

    def failing_replace(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="replace failed"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_open_corpus_errors(built, tmp_path):
    out, _, _ = built
    with pytest.raises(FileNotFoundError, match=r"corpus folder not found: .*nope — run `smoe-lab data prepare`"):
        open_corpus(tmp_path / "nope")
    c = open_corpus(out)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        c.split("test")
    with pytest.raises(ValueError, match="unknown domain"):
        c.heldout("delta")
    train = c.split("train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    with pytest.raises(ValueError):  # read-only
        train[0] = 1
    # A truncated stream is detected against meta.json.
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in out.iterdir():
        if p.is_file():
            (broken / p.name).write_bytes(p.read_bytes())
    (broken / "val.bin").write_bytes((out / "val.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match="holds .* tokens but meta.json says"):
        open_corpus(broken).split("val")
    (broken / "train.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"corpus file not found: .*train.bin — run `smoe-lab data prepare`"):
        open_corpus(broken).split("train")


def test_get_batch_shapes_shift_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(tokens, batch_size=8, block_size=32, generator=g)
    assert x.shape == y.shape == (8, 32)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # next-token targets (the stream is 0, 1, 2, ...)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows
    assert int(y.max()) <= 999
    x2, _ = get_batch(tokens, 8, 32, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    x3, _ = get_batch(tokens, 8, 32, g)  # the generator advanced
    assert not torch.equal(x, x3)
    # Every start position is reachable, including the last one (N - T - 1).
    xs, _ = get_batch(np.arange(34, dtype=np.uint16), 64, 32, torch.Generator().manual_seed(0))
    assert set(xs[:, 0].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="too short"):
        get_batch(np.arange(32, dtype=np.uint16), 2, 32, g)


def test_eval_batches_fixed_and_non_overlapping():
    tokens = np.arange(1000, dtype=np.uint16)
    full = list(iter_eval_batches(tokens, batch_size=4, block_size=10))
    starts = torch.cat([x[:, 0] for x, _ in full]).tolist()
    assert starts == list(range(0, 990, 10))  # all 99 non-overlapping windows, in order
    assert [x.shape[0] for x, _ in full] == [4] * 24 + [3]  # last batch partial
    assert all(torch.equal(y, x + 1) for x, y in full)
    capped = list(iter_eval_batches(tokens, 4, 10, max_batches=2))
    capped_starts = torch.cat([x[:, 0] for x, _ in capped]).tolist()
    assert len(capped_starts) == 8 and capped_starts[0] == 0 and capped_starts[-1] >= 800  # spread over the stream
    again = list(iter_eval_batches(tokens, 4, 10, max_batches=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(capped, again))
    assert eval_window_starts(1000, 4, 10, max_batches=1000).tolist() == list(range(0, 990, 10))
    with pytest.raises(ValueError, match="too short"):
        list(iter_eval_batches(np.arange(10, dtype=np.uint16), 2, 10))


def test_batches_from_built_corpus(built):
    out, _, meta = built
    c = open_corpus(out)
    x, y = get_batch(c.split("train"), 4, c.block_size, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and int(x.max()) < c.vocab_size
    n_val = meta["tokens"]["val"]
    assert sum(x.shape[0] for x, _ in iter_eval_batches(c.split("val"), 4, 16)) == (n_val - 1) // 16


def test_prepare_tiny_is_idempotent():
    """The default corpus (CI builds it with `smoe-lab data prepare` before pytest; built here if absent)."""
    path = prepare("tiny", progress=False)
    assert is_prepared(path, RECIPES["tiny"])
    meta_mtime = (path / "meta.json").stat().st_mtime_ns
    assert prepare("tiny", progress=False) == path
    assert (path / "meta.json").stat().st_mtime_ns == meta_mtime  # not rebuilt
    c = open_corpus("tiny")
    assert c.meta["recipe"] == RECIPES["tiny"].as_dict()
    assert c.domains == list(RECIPES["tiny"].domains)
    assert c.meta["tokenizer"]["vocab_size"] == 4096 and c.meta["dtype"] == "uint16" and c.block_size == 128
    for name in c.domains:
        assert c.meta["sources"][name]["licence"]
        assert c.meta["tokens_by_domain"][name]["train"] > 50_000
        assert c.meta["documents"][name]["heldout"] > 0
    with pytest.raises(ValueError, match="unknown corpus recipe"):
        prepare("huge")


def test_is_prepared_rejects_other_recipe(built):
    out, _, _ = built
    assert not is_prepared(out, RECIPES["tiny"])  # built from documents, with no recipe
