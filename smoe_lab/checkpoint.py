"""Checkpoints: a folder with model.safetensors + config.json (+ train_state.pt for resuming).

Hugging Face models go through the same functions: `load`, `read_config`, `load_tokenizer` and `checkpoint_hash`
take an HF folder or hub id, and `save` of an HF model writes a transformers folder (smoe_lab.hf.io).

Nothing read from disk is unpickled: weights are safetensors, metadata JSON, and the optimizer state is
loaded with torch.load(weights_only=True). Writes are atomic: a checkpoint folder is built under a temporary
name and renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
TOKENIZER = "tokenizer"
FORMAT_VERSION = 1


def _state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to transformer.wte.weight
    return state


def atomic_dir(path: Path):
    """Context helper: yields a temp folder beside `path`; on success it replaces `path` atomically."""

    class _Atomic:
        def __enter__(self_inner) -> Path:
            path.parent.mkdir(parents=True, exist_ok=True)
            self_inner.tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
            return self_inner.tmp

        def __exit__(self_inner, exc_type, exc, tb) -> bool:
            if exc_type is not None:
                shutil.rmtree(self_inner.tmp, ignore_errors=True)
                return False
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                os.replace(path, old)
            os.replace(self_inner.tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return False

    return _Atomic()


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save(
    model: torch.nn.Module,
    path: str | Path,
    train_state: dict[str, Any] | None = None,
    tokenizer: Any = None,
    **meta: Any,
) -> Path:
    """Write model weights + config (+ optional train state and tokenizer) to the folder `path`, atomically.

    With a tokenizer the checkpoint is self-contained: `load_tokenizer(path)` needs nothing else.
    """
    if getattr(model, "hf_family", None) is not None:  # a Hugging Face model: a transformers folder
        from . import hf

        return hf.save(model, path, tokenizer=tokenizer, train_state=train_state, **meta)
    path = Path(path)
    with atomic_dir(path) as tmp:
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        save_file(_state_for_saving(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        doc = {"format_version": FORMAT_VERSION, "model_config": model.config.to_dict(), "meta": meta}
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
    return path


def _hf(path) -> bool:
    from .hf.source import is_hf_source

    return is_hf_source(path)


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, meta) of a checkpoint folder; for an HF folder or hub id (smoe_lab.hf.HFConfig, meta)."""
    if _hf(path):
        from . import hf

        return hf.read_config(path)
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"not a smoe_lab checkpoint (no {CONFIG}): {path}")
    doc = json.loads(cfg_file.read_text())
    return ModelConfig.from_dict(doc["model_config"]), doc.get("meta", {})


def load(path: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint folder into a new GPT model (eval mode); an HF folder or hub id into smoe_lab.hf's adapter."""
    from .model import GPT

    if _hf(path):
        from . import hf

        return hf.load(path, device=device)

    path = Path(path)
    config, meta = read_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint has no {WEIGHTS}: {path}")
    model = GPT(config)
    state = load_file(str(weights), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.checkpoint_meta = meta
    model.checkpoint_path = str(path)
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved with a checkpoint (or, for older checkpoints, the one of the corpus it was trained on);
    for an HF folder or hub id the model's own tokenizer."""
    from .data.tokenizer import load_tokenizer as _load

    if _hf(path):
        from . import hf

        return hf.load_tokenizer(path)

    path = Path(path)
    if (path / TOKENIZER).is_dir():
        return _load(path / TOKENIZER)
    _, meta = read_config(path)
    if meta.get("corpus") and (Path(meta["corpus"]) / "tokenizer").is_dir():
        return _load(Path(meta["corpus"]) / "tokenizer")
    raise FileNotFoundError(f"checkpoint {path} has no tokenizer/ folder and names no corpus with one")


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    f = Path(path) / TRAIN_STATE
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def checkpoint_hash(path: str | Path) -> str:
    """sha256 of the weights file: identifies the exact model a calibration artifact was made from."""
    if _hf(path):
        from . import hf

        return hf.checkpoint_hash(path)
    h = hashlib.sha256()
    with open(Path(path) / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (names, shapes, bytes) without writing it to disk."""
    h = hashlib.sha256()
    for k, v in sorted(_state_for_saving(model).items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.to(torch.float32).numpy().tobytes() if v.dtype == torch.bfloat16 else v.numpy().tobytes())
    return h.hexdigest()
