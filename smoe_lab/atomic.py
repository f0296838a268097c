"""Crash-safe writes: a file or a folder replaces its path atomically (temporary name beside it, fsync, rename,
fsync the parent), and an interrupted folder replacement is finished by the next read or write (`recover`).
The checkpoint folders (smoe_lab.checkpoint), run summaries and metrics logs are written through these."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import faults


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (created, renamed files) durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under root (deepest first), then root itself."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def _old(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def recover(path: str | Path) -> None:
    """Finish an interrupted replacement of the checkpoint folder `path` (see the module docstring)."""
    path = Path(path)
    old = _old(path)
    if not old.exists():
        return
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)  # the new checkpoint landed; the old copy is stale
    else:
        os.replace(old, path)  # the new one never landed: the previous checkpoint is the valid one
        fsync_dir(path.parent)


def atomic_dir(path: Path):
    """Context helper: yields a temp folder beside `path`; on success it replaces `path` (see module docstring)."""

    class _Atomic:
        def __enter__(self_inner) -> Path:
            path.parent.mkdir(parents=True, exist_ok=True)
            recover(path)
            for stale in path.parent.glob(_tmp_prefix(path) + "*"):  # left by a writer that was killed
                shutil.rmtree(stale, ignore_errors=True)
            self_inner.tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
            return self_inner.tmp

        def __exit__(self_inner, exc_type, exc, tb) -> bool:
            if exc_type is not None:
                shutil.rmtree(self_inner.tmp, ignore_errors=True)
                return False
            fsync_tree(self_inner.tmp)
            faults.hit("save-written")
            old = _old(path)
            if path.exists():
                os.replace(path, old)
                fsync_dir(path.parent)
                faults.hit("save-swapped")
            os.replace(self_inner.tmp, path)
            fsync_dir(path.parent)
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
            return False

    return _Atomic()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, fsync, rename, fsync the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
