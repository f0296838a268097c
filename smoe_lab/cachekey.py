"""Cache keys: the one place that says when a cached result is still valid.

Every cache of the workbench (the pipeline's per-notebook stamps, the pretrain skip, calibration artifacts, reduced
checkpoints, finetuning results) stores `key(kind, **parts)` beside what it made and reuses it only when the key
recomputed now is equal. A key hashes everything that changes the result:

- the package's source (`source_hash`: every .py file under smoe_lab/, by relative path and content), so editing
  one line of smoe_lab/moe.py invalidates every cached model, artifact and notebook;
- the data's content, never a file name (`data_hash` of files and folders, `corpus_hash` of a prepared corpus,
  `examples_hash` of task examples, `tensors_hash` of calibration batches);
- every parameter passed in `parts` (seeds, batch sizes, configs, checkpoint hashes).

A prepared corpus's token files (.bin) are represented by the sha256 its meta.json recorded when it was built (plus
the file size): reading gigabytes of tokens at every start would cost minutes, and the build writes meta.json last.
Every other file is hashed by content. Digests are memoised per process by (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .data.corpus import RECIPES
from .paths import prepared_dir

SOURCE_DIR = Path(__file__).resolve().parent  # what source_hash reads (tests point it at a modified copy)
KEY_VERSION = 1
_file_memo: dict[tuple[str, int, int], str] = {}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (memoised by path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _file_memo:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _file_memo[memo] = h.hexdigest()
    return _file_memo[memo]


def _tree_files(root: Path, suffixes: Sequence[str] | None = None) -> list[Path]:
    """Regular files under root in a stable order, skipping hidden files and folders and __pycache__."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.startswith(".") or (suffixes is not None and not name.endswith(tuple(suffixes))):
                continue
            out.append(Path(dirpath) / name)
    return out


def data_hash(path: str | os.PathLike, overrides: dict[str, str] | None = None) -> str:
    """Content hash of a file, or of a folder (relative names + contents of every file under it).

    overrides: relative name -> a digest to use instead of reading that file (see `corpus_hash`).
    A missing path raises FileNotFoundError naming it.
    """
    p = Path(path)
    if p.is_file():
        return file_hash(p)
    if not p.is_dir():
        raise FileNotFoundError(f"cannot hash data that does not exist: {p}")
    h = hashlib.sha256()
    for f in _tree_files(p):
        rel = f.relative_to(p).as_posix()
        digest = (overrides or {}).get(rel) or file_hash(f)
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def source_hash() -> str:
    """sha256 over every .py file of the package (relative path + content): the code a result came from."""
    h = hashlib.sha256()
    for f in _tree_files(SOURCE_DIR, suffixes=(".py",)):
        h.update(f"{f.relative_to(SOURCE_DIR).as_posix()}\0{file_hash(f)}\n".encode())
    return h.hexdigest()


def corpus_hash(folder: str | os.PathLike) -> str:
    """Content hash of a prepared corpus folder; token files count by the sha256 recorded in meta.json."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    overrides: dict[str, str] = {}
    if meta_path.is_file():
        try:
            recorded = json.loads(meta_path.read_text()).get("sha256") or {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corpus meta file {meta_path} is not valid JSON ({e})") from None
        if isinstance(recorded, dict):
            for name, digest in recorded.items():
                f = folder / name
                if f.is_file():
                    overrides[name] = f"{digest}:{f.stat().st_size}"
    return data_hash(folder, overrides)


def examples_hash(examples: Iterable[Any]) -> str:
    """Content hash of task examples (task, idx, input, choices, label, answers), in order."""
    h = hashlib.sha256()
    for e in examples:
        row = [e.task, str(e.idx), e.input, list(e.choices), e.label, list(getattr(e, "answers", ()))]
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def tensors_hash(items: Iterable[Any]) -> str:
    """Content hash of a sequence of tensors or tuples of tensors (dtype, shape and bytes): calibration batches."""
    import torch

    h = hashlib.sha256()
    for item in items:
        for t in item if isinstance(item, (tuple, list)) else (item,):
            t = torch.as_tensor(t).detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def corpus_key(spec: Any) -> str:
    """Content hash of the corpus a spec names (a prepared folder, or a recipe name under the prepared data dir).

    An unprepared recipe keys as "unprepared:<name>" (whatever prepares it later changes the key).
    """
    if spec is None:
        return "none"
    p = Path(str(spec)).expanduser()
    if p.is_dir():
        return corpus_hash(p)
    if str(spec) in RECIPES:
        folder = prepared_dir() / str(spec)
        return corpus_hash(folder) if (folder / "meta.json").is_file() else f"unprepared:{spec}"
    return f"missing:{spec}"


def key(kind: str, **parts: Any) -> str:
    """The cache key of one result: sha256 of (kind, the package source, parts) as sorted JSON.

    parts must be JSON-able (configs via to_dict(), data via the *_hash functions above); anything else is
    stringified, so pass content hashes, not objects.
    """
    doc = {"kind": kind, "version": KEY_VERSION, "source": source_hash(), "parts": parts}
    return _sha(json.dumps(doc, sort_keys=True, default=str).encode())
