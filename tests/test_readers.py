"""Streaming readers (C4 JSON Lines, CC100 text) and the fast GPT-2 encoder's parity with the project tokenizer."""

from __future__ import annotations

import gzip
import lzma

import numpy as np
import pytest

from smoe_lab.data import readers
from smoe_lab.data.corpus import clean_document
from smoe_lab.data.gpt2_fast import EOT_ID, FastGPT2
from smoe_lab.data.sources import DOMAINS
from smoe_lab.data.tokenizer import GPT2Tokenizer
from tests.build_inputs import shipped_docs, write_c4

TRICKY = [
    "Hello world",
    "It's 'quoted' and we'll see: they're, I'd, you've, he'll   ok",
    "  leading and trailing spaces   ",
    "tabs\tand\r\nCRLF lines\n\n\nand runs of newlines\n",
    "numbers 1234567890 3.14159 1,000,000 and 2nd 3rd",
    "unicode: naïve café Ünïcödé — “quotes” … ½ ² 中文字符 日本語 한국어 العربية",
    "emoji 😀👍🏽 and combining e\u0301 and zero-width\u200bjoiner",
    "code: def f(x):\n    return x ** 2  # comment\n\tif a != b: pass",
    "<|endoftext|> is plain text here",
    "    \n\n   ",
    "a" * 3000,
]


@pytest.fixture(scope="module")
def encoders():
    return FastGPT2(), GPT2Tokenizer.load()


def test_fast_encoder_ids_equal_the_project_gpt2_tokenizer(encoders):
    fast, ref = encoders
    # documents as the builder gives them (clean_document: a literal <|endoftext|> is removed, which the HF
    # tokenizer would read as the special token and tiktoken's ordinary encoding as text)
    docs = [clean_document(t) for t in TRICKY] + [d for name in DOMAINS for d in shipped_docs(name, 0, 40)]
    want = ref.encode_batch(docs)
    got = fast.encode_batch(docs)
    assert [g.tolist() for g in got] == want
    assert [g.tolist() for g in fast.encode_batch(docs, threads=2)] == want  # threads split the batch, same ids
    assert fast.encode("Hello world").tolist() == [15496, 995]
    assert EOT_ID == ref.eot_id == 50256


def test_fast_encoder_handles_lone_surrogates(encoders):
    fast, _ = encoders
    ids = fast.encode("bad \ud800 surrogate")  # JSON escapes can produce these; replaced, not a crash
    assert len(ids) > 0 and ids.dtype == np.uint32


def test_cc100_documents_split_at_blank_lines(tmp_path):
    path = tmp_path / "en.txt.xz"
    raw = "Para one.\nPara two of doc 1.\n\nDoc 2 only para.\n\n\n\nDoc 3 first.\r\n  \nDoc 4 has no final blank"
    with lzma.open(path, "wt", encoding="utf-8") as f:
        f.write(raw)
    got = list(readers.iter_documents(str(path)))
    assert [t for t, _ in got] == [
        "Para one.\nPara two of doc 1.",
        "Doc 2 only para.",
        "Doc 3 first.",
        "Doc 4 has no final blank",
    ]
    # the end offsets resume exactly: reading from a document's end gives the documents after it
    for k, (_, end) in enumerate(got):
        assert [t for t, _ in readers.iter_documents(str(path), start=end)] == [t for t, _ in got[k + 1 :]]
    assert got[-1][1] == len(raw.encode())


def test_jsonl_reader_and_resume_offsets(tmp_path):
    docs = shipped_docs("news", 0, 5)
    path = write_c4(tmp_path / "c4-train.00000-of-00001.json.gz", docs) and tmp_path / "c4-train.00000-of-00001.json.gz"
    got = list(readers.iter_documents(str(path)))
    assert [t for t, _ in got] == docs
    assert [t for t, _ in readers.iter_documents(str(path), start=got[1][1])] == docs[2:]
    plain = tmp_path / "rows.jsonl"
    plain.write_text('{"body": "x"}\n\n{"body": "y"}\n')
    assert [t for t, _ in readers.iter_documents(str(plain), text_field="body")] == ["x", "y"]
    with pytest.raises(ValueError, match="no string field 'text'"):
        list(readers.iter_documents(str(plain)))


def test_bad_inputs_give_one_clear_error(tmp_path):
    garbage = tmp_path / "c4-bad.json.gz"
    garbage.write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(ValueError, match=r"corrupt input file .*c4-bad.json.gz: not a gzip file"):
        readers.check_file(str(garbage))
    good = write_c4(tmp_path / "a.json.gz", shipped_docs("news", 0, 30)) and (tmp_path / "a.json.gz").read_bytes()
    cut = tmp_path / "truncated.json.gz"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"corrupt input file .*truncated.json.gz at decompressed byte"):
        list(readers.iter_documents(str(cut)))  # reported where it is met, naming the file
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not a JSON object"):
        list(readers.iter_documents(str(bad_json)))
    with pytest.raises(ValueError, match="no reader for this file name"):
        readers.file_format("corpus.parquet")
    with pytest.raises(FileNotFoundError):
        readers.check_file(str(tmp_path / "missing.json.gz"))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        readers.check_file(str(empty))
    assert gzip.decompress(good).count(b"\n") == 30


def test_expand_sorts_globs_and_urls(tmp_path):
    for name in ("b.json.gz", "a.json.gz", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert readers.expand(str(tmp_path / "*.json.gz")) == [str(tmp_path / "a.json.gz"), str(tmp_path / "b.json.gz")]
    assert readers.expand(str(tmp_path / "nothing-*.json.gz")) == []
    urls = readers.expand(f"file://{tmp_path}/*.json.gz")  # fsspec paths (hf://datasets/allenai/c4/... on the hub)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["a.json.gz", "b.json.gz"] and urls[0].startswith("file://")
