"""Streaming document readers for the paper's pretraining text: C4 / mC4 JSON Lines and CC100 plain text.

Every reader yields `(text, end)` pairs, where `end` is the offset in the *decompressed* byte stream just past the
document: a build records it in each shard's manifest, and `iter_documents(path, start=end)` resumes there
(decompressing and discarding up to `end`, never tokenizing twice). Nothing is held beyond one line, so memory
does not grow with the file.

Formats, chosen by the file name (`file_format`):

    *.json.gz *.jsonl.gz *.json *.jsonl *.jsonl.xz *.json.xz   JSON Lines, one object per line with a text field
                                                              (C4 `en`, mC4 `en-multi` on the hub: allenai/c4)
    *.txt *.txt.xz *.txt.gz *.xz                              CC100: one paragraph per line, a blank line between
                                                              documents (`en.txt.xz`); paragraphs of a document
                                                              are joined with "\\n"

Paths with a scheme (`hf://datasets/allenai/c4/en/c4-train.00000-of-01024.json.gz`, `file://...`) are opened
through `fsspec` (installed with `datasets`), so a build can stream the hub's files where the hub is reachable.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

JSONL = "jsonl"
CC100 = "cc100"
FORMATS = {
    ".json.gz": (JSONL, "gzip"),
    ".jsonl.gz": (JSONL, "gzip"),
    ".json.xz": (JSONL, "xz"),
    ".jsonl.xz": (JSONL, "xz"),
    ".json": (JSONL, None),
    ".jsonl": (JSONL, None),
    ".txt.xz": (CC100, "xz"),
    ".txt.gz": (CC100, "gzip"),
    ".txt": (CC100, None),
    ".xz": (CC100, "xz"),
}
MAGIC = {"gzip": b"\x1f\x8b", "xz": b"\xfd7zXZ\x00"}
_CHUNK = 1 << 20


def file_format(path: str) -> tuple[str, str | None]:
    """(format, compression) of an input file from its name; ValueError for names no reader handles."""
    name = str(path).lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    known = " ".join(sorted(FORMATS))
    raise ValueError(f"input file {path}: no reader for this file name; supported endings: {known}")


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise ImportError("paths with a scheme (hf://, s3://, ...) need fsspec: pip install 'smoe_lab[hf]'") from None
    return fsspec


def open_raw(path: str):
    """The file's compressed bytes as a binary file object (local, or through fsspec for URLs)."""
    if is_remote(path):
        return _fsspec().open(path, "rb").open()
    return open(path, "rb")


@dataclass(frozen=True)
class FileIdentity:
    """What a manifest records about an input file; a shard is reused only for the same identity."""

    path: str
    size: int
    mtime_ns: int | None
    sha256: str

    def as_dict(self) -> dict:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns, "sha256": self.sha256}


def stat_file(path: str) -> tuple[int, int | None]:
    """(size in bytes, mtime in ns or None) without reading the file."""
    if is_remote(path):
        fs, p = _fsspec().core.url_to_fs(path)
        return int(fs.size(p)), None
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def sha256_file(path: str) -> str:
    """SHA-256 of the file's bytes (for hub files, the LFS hash the hub publishes when it has one)."""
    if is_remote(path):
        fs, p = _fsspec().core.url_to_fs(path)
        lfs = (fs.info(p).get("lfs") or {}).get("sha256")
        if lfs:
            return str(lfs)
    h = hashlib.sha256()
    with open_raw(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def identify(path: str) -> FileIdentity:
    size, mtime = stat_file(path)
    return FileIdentity(str(path), size, mtime, sha256_file(path))


def open_text_stream(path: str) -> io.BufferedReader:
    """Decompressed bytes of an input file (gzip / xz by name), buffered for fast line iteration."""
    _, compression = file_format(path)
    raw = open_raw(path)
    if compression == "gzip":
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), buffer_size=_CHUNK)
    if compression == "xz":
        return io.BufferedReader(lzma.LZMAFile(raw, mode="rb"), buffer_size=_CHUNK)
    return io.BufferedReader(raw, buffer_size=_CHUNK)


def corrupt(path: str, err: BaseException, offset: int | None = None) -> ValueError:
    """The one error a damaged input gives: it names the file (and where, when known)."""
    where = f" at decompressed byte {offset:,}" if offset is not None else ""
    return ValueError(f"corrupt input file {path}{where}: {type(err).__name__}: {err}")


DECODE_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def _skip(stream: io.BufferedReader, path: str, start: int) -> None:
    left = start
    while left > 0:
        got = len(stream.read(min(left, _CHUNK)))
        if got == 0:
            raise ValueError(
                f"input file {path} is shorter ({start - left:,} bytes) than its manifest says ({start:,})"
            )
        left -= got


def _lines(path: str, start: int) -> Iterator[tuple[bytes, int]]:
    """(line, offset past it) from decompressed byte `start` on; decoding errors name the file."""
    pos = start
    with open_text_stream(path) as stream:  # a missing file fails here, as FileNotFoundError
        try:
            _skip(stream, path, start)
            for line in stream:
                pos += len(line)
                yield line, pos
        except DECODE_ERRORS as e:
            raise corrupt(path, e, pos) from None


def iter_jsonl(path: str, start: int = 0, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """(text, end offset) per JSON Lines record with a string `text_field`; blank lines are skipped."""
    line_no = 0
    for line, end in _lines(path, start):
        line_no += 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f"line {line_no}" + (f" after byte {start:,}" if start else "")
            raise ValueError(f"input file {path}, {where}: not a JSON object ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"input file {path}, line {line_no}: no string field {text_field!r} (has: {fields})")
        yield row[text_field], end


def iter_cc100(path: str, start: int = 0) -> Iterator[tuple[str, int]]:
    """(document, end offset) of CC100 text: paragraph lines up to a blank line, joined with "\\n".

    Bytes that are not UTF-8 are replaced (U+FFFD) rather than failing a 300 GB file on one bad byte.
    """
    paras: list[str] = []
    end = start
    for line, end in _lines(path, start):
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        if text.strip():
            paras.append(text)
        elif paras:
            yield "\n".join(paras), end
            paras = []
    if paras:
        yield "\n".join(paras), end


def iter_documents(path: str, start: int = 0, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """(raw document text, end offset) of any supported input file, from decompressed byte `start`."""
    fmt, _ = file_format(path)
    return iter_jsonl(path, start, text_field) if fmt == JSONL else iter_cc100(path, start)


def check_file(path: str, text_field: str = "text") -> None:
    """Cheap checks before a build writes anything: readable, the compression's magic bytes, and the first
    document parses. A file damaged further in is reported by the build when it gets there."""
    _, compression = file_format(path)
    try:
        with open_raw(path) as f:
            head = f.read(8)
    except OSError as e:
        raise FileNotFoundError(f"input file {path} cannot be read: {e}") from None
    if not head:
        raise ValueError(f"input file {path} is empty")
    if compression and not head.startswith(MAGIC[compression]):
        raise ValueError(f"corrupt input file {path}: not a {compression} file (its first bytes are {head[:6]!r})")
    for _ in iter_documents(path, 0, text_field):
        break


def expand(pattern: str) -> list[str]:
    """The files a source pattern names, sorted: a path, a glob (`*`, `?`, `[...]`, `**`), or a URL glob."""
    if is_remote(pattern):
        fs, p = _fsspec().core.url_to_fs(pattern)
        proto = pattern.split("://", 1)[0]
        found = fs.glob(p) if any(c in p for c in "*?[") else ([p] if fs.exists(p) else [])
        return sorted(f"{proto}://{f}" if "://" not in f else f for f in found)
    if any(c in pattern for c in "*?["):
        root = Path(pattern).anchor or "."
        rel = str(Path(pattern).relative_to(root)) if Path(pattern).is_absolute() else pattern
        return sorted(str(p) for p in Path(root).glob(rel) if p.is_file())
    return [pattern]
