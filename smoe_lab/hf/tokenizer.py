"""A Hugging Face model's own tokenizer behind smoe_lab's tokenizer interface (smoe_lab.data.tokenizer.Tokenizer).

The task code asks a tokenizer for `encode_batch` (ids without special tokens: prompts and answers are encoded
separately and joined), `eot_id` (padding, and the prompt of an empty input), `vocab_size` and `save`. Special tokens
a model expects are added by the adapter, which knows the model: BOS in front for the Llama-style families, EOS after
a T5 encoder input (smoe_lab.hf.model).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path


class HFTokenizer:
    kind = "hf"

    def __init__(self, tok, name: str = ""):
        self.tok = tok
        self.name = name or getattr(tok, "name_or_path", "") or "hf"
        eot = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
        if eot is None:
            raise ValueError(f"tokenizer {self.name!r} has neither an EOS nor a padding token")
        self._eot_id = int(eot)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self.tok)

    @property
    def eot_id(self) -> int:
        """EOS (or, without one, the padding token): pads batches and stands for an empty prompt."""
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> Path:
        """The tokenizer's own files (save_pretrained) in `directory`, beside the model's."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save_pretrained(str(directory))
        return directory

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"
