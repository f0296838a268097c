"""Where a Hugging Face model is: a local folder (config.json with a model_type) or a hub id ("google/switch-base-8").

Import-light (no transformers): smoe_lab.checkpoint asks `is_hf_source` before every load, so a native checkpoint
never pays for importing transformers. Hub ids resolve through huggingface_hub's own cache (a local copy is used
without the network; otherwise the snapshot is downloaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

RECORD = "smoe_lab.json"  # smoe_lab's side file in an HF folder: experts per layer, expert map, run meta
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_HASHES: dict[tuple, str] = {}


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def is_hf_folder(path) -> bool:
    """A folder holding a transformers config.json (model_type set), not a smoe_lab checkpoint's config.json."""
    try:
        cfg = Path(path) / "config.json"
        if not cfg.is_file():
            return False
    except (TypeError, OSError):
        return False
    doc = _read_json(cfg)
    return bool(doc) and "model_type" in doc and "model_config" not in doc


def is_hub_id(spec) -> bool:
    """'org/name' that is not a local path (relative paths that exist locally are folders, never hub ids)."""
    s = str(spec)
    return bool(_HUB_ID.fullmatch(s)) and not Path(s).exists() and not s.startswith((".", "~"))


def is_hf_source(spec) -> bool:
    return is_hf_folder(spec) or is_hub_id(spec)


def resolve(spec) -> Path:
    """The local folder of an HF folder or hub id (downloaded into the huggingface_hub cache when needed)."""
    if is_hf_folder(spec):
        return Path(spec)
    if not is_hub_id(spec):
        raise FileNotFoundError(f"not a Hugging Face model folder (no config.json with a model_type) or hub id: {spec}")
    folder = _snapshot(str(spec), ["*.safetensors"])
    if not any(folder.glob("*.safetensors")):  # an older repo with PyTorch weights only
        folder = _snapshot(str(spec), ["*.bin"])
    return folder


def _snapshot(repo: str, weights: list[str]) -> Path:
    """The repo's config, tokenizer and weight files from the local cache, else downloaded."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.model", "*.txt", "*.tiktoken", *weights]
    try:
        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=patterns))
    except Exception:  # not cached (or not completely): fetch it
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"{repo}: no such local folder, and the Hugging Face hub could not provide it ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]})"
        ) from None


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: *.safetensors, else (older repos) PyTorch *.bin files."""
    files = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"Hugging Face folder {folder} has no *.safetensors (or *.bin) weights")
    return files


def checkpoint_hash(spec) -> str:
    """sha256 identifying the weights of an HF folder: over the names and contents of its weight files.

    A huggingface_hub snapshot links each file to a blob named by its sha256 (git-lfs), so those are hashed by name
    without reading gigabytes; other files are read once per process (memoised by path, size and mtime).
    """
    folder = resolve(spec)
    h = hashlib.sha256()
    for f in weight_files(folder):
        h.update(f.name.encode())
        target = Path(os.path.realpath(f))
        if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
            h.update(target.name.encode())
            continue
        st = target.stat()
        key = (str(target), st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            fh = hashlib.sha256()
            with open(target, "rb") as fp:
                for chunk in iter(lambda: fp.read(1 << 20), b""):
                    fh.update(chunk)
            _HASHES[key] = fh.hexdigest()
        h.update(_HASHES[key].encode())
    record = _read_json(folder / RECORD) or {}
    h.update(json.dumps(record.get("experts_per_layer"), sort_keys=True).encode())
    return h.hexdigest()


def checkpoint_name(path) -> str:
    """A readable, unique-per-model name for run folders: a hub snapshot's repo ('google--switch-base-8'), the
    parent of a folder called 'checkpoint' (smoe_lab's run layout), else the folder's own name."""
    p = Path(path)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name[len("models--") :]
    return p.parent.name if p.name == "checkpoint" else p.name
