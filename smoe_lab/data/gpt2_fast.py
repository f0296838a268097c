"""GPT-2 BPE at corpus-building speed: tiktoken's Rust encoder, built offline from the project's GPT-2 files.

The project's `GPT2Tokenizer` (HF `tokenizers`) stays the reference; this encoder must give the same ids on every
document (tests/test_build.py checks it on the shipped text), and it is ~5x faster per core
(`benchmarks/bench_data.py` measures both side by side). The `Encoding` is built from `encoder.json` / `vocab.bpe`
(hash-checked against OpenAI's published SHA-256 by tiktoken's own loader, with its download cache switched off:
TIKTOKEN_CACHE_DIR=""), GPT-2's split pattern, and <|endoftext|> = 50256; nothing is fetched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from smoe_lab.data.tokenizer import EOT_TOKEN, GPT2_SHA256, GPT2_VOCAB_SIZE, atomic_write_bytes, gpt2_bpe_files

ENCODER_JSON = "encoder.json"
VOCAB_BPE = "vocab.bpe"
EOT_ID = GPT2_VOCAB_SIZE - 1


def _tiktoken():
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        raise ImportError("the corpus builder needs tiktoken: pip install tiktoken") from None
    return tiktoken


def backend_version() -> str:
    return f"tiktoken {_tiktoken().__version__}"


def write_bpe_files(directory: str | os.PathLike) -> Path:
    """Write GPT-2's encoder.json and vocab.bpe (hash-checked) into `directory`; returns it."""
    directory = Path(directory)
    encoder, merges = gpt2_bpe_files()
    atomic_write_bytes(directory / ENCODER_JSON, encoder)
    atomic_write_bytes(directory / VOCAB_BPE, merges)
    return directory


def load_encoding(directory: str | os.PathLike | None = None):
    """The GPT-2 `tiktoken.Encoding` from `directory`/{encoder.json, vocab.bpe} (default: the project's files).

    tiktoken checks both files against OpenAI's published SHA-256 (ValueError on a mismatch).
    """
    tiktoken = _tiktoken()
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's split pattern (tiktoken's "gpt2")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(directory) if directory is not None else write_bpe_files(tmp)
        old = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files, write no cache
        try:
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=str(folder / VOCAB_BPE),
                encoder_json_file=str(folder / ENCODER_JSON),
                vocab_bpe_hash=GPT2_SHA256[VOCAB_BPE],
                encoder_json_hash=GPT2_SHA256[ENCODER_JSON],
            )
        finally:
            if old is None:
                os.environ.pop("TIKTOKEN_CACHE_DIR", None)
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = old
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def _encode_one(enc, text: str) -> np.ndarray:
    # encode_to_numpy with no special tokens allowed or disallowed == encode_ordinary, without a Python list
    try:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates (e.g. from JSON escapes): the fix tiktoken's encode() applies
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


class FastGPT2:
    """Batch encoder: token ids per document as uint32 arrays, optionally on several threads (the Rust encoder
    releases the GIL, so threads scale within one process)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.enc = load_encoding(directory)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def encode(self, text: str) -> np.ndarray:
        return _encode_one(self.enc, text)

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        """Ids of each text (same as `GPT2Tokenizer.encode` per text); `threads` > 1 splits the batch."""
        if threads <= 1 or len(texts) < 2:
            return [_encode_one(self.enc, t) for t in texts]
        if self._pool is None or self._pool_size < threads:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool, self._pool_size = ThreadPoolExecutor(threads), threads
        step = -(-len(texts) // threads)
        parts = self._pool.map(
            lambda i: [_encode_one(self.enc, t) for t in texts[i : i + step]], range(0, len(texts), step)
        )
        return [a for part in parts for a in part]
