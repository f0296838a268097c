"""The shard files of a built corpus and their manifests: names, reading a manifest, `ShardWriter` (a shard under a
temporary name, renamed, then its manifest). Used by smoe_lab.data.build (see its docstring for the layout)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from smoe_lab.data.tokenizer import atomic_write_bytes

from .build_settings import DTYPE


def train_name(file_index: int, part: int) -> str:
    return f"train-{file_index:05d}-{part:05d}"


_TRAIN = re.compile(r"^train-(\d{5})-(\d{5})\.json$")


def read_manifest(path: Path) -> dict | None:
    """A finished shard's manifest, or None when the shard is unfinished (no manifest, or the .bin does not
    hold the tokens the manifest says)."""
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    shard = path.with_suffix(".bin")
    if not shard.is_file() or shard.stat().st_size != man.get("tokens", -1) * DTYPE.itemsize:
        return None
    return man


def _manifest_bytes(man: dict) -> bytes:
    return (json.dumps(man, indent=2, sort_keys=True) + "\n").encode("utf-8")


class ShardWriter:
    """Appends document token arrays to `<stem>.bin` under a temporary name; `finish` renames it into place and
    then writes `<stem>.json` (the manifest, written last: a shard is finished when its manifest is there)."""

    def __init__(self, folder: Path, stem: str, start: int):
        self.final = folder / f"{stem}.bin"
        self.manifest = folder / f"{stem}.json"
        self.tmp = folder / f".{stem}.bin.tmp-{os.getpid()}"
        self.f = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.start = self.end = start
        self.docs = self.tokens = 0

    def add(self, ids: np.ndarray, end: int) -> None:
        data = ids.astype(DTYPE).tobytes()  # ids [n] + eot, little-endian uint16
        self.f.write(data)
        self.hash.update(data)
        self.docs += 1
        self.tokens += len(ids)
        self.end = end

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def finish(self, **fields) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)
        man = {
            "shard": self.final.name,
            "start_offset": self.start,
            "end_offset": self.end,
            "docs": self.docs,
            "tokens": self.tokens,
            "sha256": self.hash.hexdigest(),
            **fields,
        }
        atomic_write_bytes(self.manifest, _manifest_bytes(man))
        return man
