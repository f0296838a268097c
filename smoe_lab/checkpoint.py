"""Checkpoints: a folder with model.safetensors + config.json (+ train_state.pt for resuming).

Hugging Face models go through the same functions: `load`, `read_config`, `load_tokenizer` and `checkpoint_hash`
take an HF folder or hub id, and `save` of an HF model writes a transformers folder (smoe_lab.hf.io).

Nothing read from disk is unpickled: weights are safetensors, metadata JSON, and the optimizer state is
loaded with torch.load(weights_only=True). Writes survive a crash at any point:

- a checkpoint folder is built under a temporary name beside its path, every file and the folder fsync'ed;
- replacing an existing checkpoint moves the old one aside to `.<name>.old`, renames the new one into place,
  fsyncs the parent folder, and only then deletes the old one: there is always a complete checkpoint on disk;
- the next read or write of the path (`recover`) finishes an interrupted replacement: the old copy is restored
  when the new one never landed, and removed when it did; a leftover temporary folder is removed by the next save.

A truncated or corrupted file (weights, config JSON, train state, tokenizer) raises ValueError naming the file and
what is wrong, never a library traceback.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import hf
from .atomic import (  # noqa: F401  (checkpoint.atomic_dir, atomic_write_text, recover stay public here)
    atomic_dir,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
    recover,
)
from .config import ModelConfig
from .data.tokenizer import load_tokenizer as _load
from .hf.source import is_hf_source
from .model import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
TOKENIZER = "tokenizer"
FORMAT_VERSION = 1
TRAIN_STATE_KEYS = ("step", "generator", "torch_rng")  # + "optimizer" (native loop) or "deepspeed_tag"


def _state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to transformer.wte.weight
    return state


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
    return is_hf_source(path)


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, meta) of a checkpoint folder; for an HF folder or hub id (smoe_lab.hf.HFConfig, meta)."""
    if _hf(path):
        return hf.read_config(path)
    path = Path(path)
    recover(path)
    cfg_file = path / CONFIG
    if path.is_file():
        raise FileNotFoundError(f"not a smoe_lab checkpoint: {path} is a file, a checkpoint is a folder with {CONFIG}")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"not a smoe_lab checkpoint (no {CONFIG}): {path}")
    try:
        doc = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model_config"), dict):
        raise ValueError(f"{cfg_file} is not a smoe_lab checkpoint config (no 'model_config' mapping)")
    try:
        config = ModelConfig.from_dict(doc["model_config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_file}: invalid model_config: {e}") from None
    meta = doc.get("meta", {})
    return config, meta if isinstance(meta, dict) else {}


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy `state` into `model`, requiring every parameter (a tied lm_head may be absent) and nothing else;
    ValueError naming `source` on a missing, unexpected or wrongly shaped tensor."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(f"{source}: weights do not fit the model config: {first}") from None
    tied = getattr(model.config, "tie_embeddings", False)
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load(path: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint folder into a new GPT model (eval mode); an HF folder or hub id into smoe_lab.hf's adapter."""
    if _hf(path):
        return hf.load(path, device=device)

    path = Path(path)
    config, meta = read_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint has no {WEIGHTS}: {path}")
    model = GPT(config)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupted?): {e}") from None
    load_weights_into(model, state, weights)
    model.checkpoint_meta = meta
    model.checkpoint_path = str(path)
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved with a checkpoint (or, for older checkpoints, the one of the corpus it was trained on);
    for an HF folder or hub id the model's own tokenizer."""
    if _hf(path):
        return hf.load_tokenizer(path)

    path = Path(path)
    _, meta = read_config(path)
    folder = path / TOKENIZER
    if not folder.is_dir() and meta.get("corpus") and (Path(meta["corpus"]) / "tokenizer").is_dir():
        folder = Path(meta["corpus"]) / "tokenizer"
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {path} has no tokenizer/ folder and names no corpus with one")
    try:
        return _load(folder)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - json, tokenizers and our own readers raise many types
        for f in sorted(folder.glob("*.json")):  # name the broken file when it is one of them
            try:
                json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as bad:
                raise ValueError(f"tokenizer file {f} is not valid JSON (truncated or corrupted?): {bad}") from None
        raise ValueError(f"tokenizer {folder} is not readable (truncated or corrupted?): {e}") from None


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    """The train state saved with a checkpoint (None when it has none); ValueError when the file is unreadable."""
    path = Path(path)
    recover(path)
    f = path / TRAIN_STATE
    if not f.is_file():
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(f"{f} is not a readable train state (truncated or corrupted?): {e}") from None
    missing = [k for k in TRAIN_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{f} is not a smoe_lab train state: missing {missing}")
    return state


def checkpoint_hash(path: str | Path) -> str:
    """sha256 of the weights file: identifies the exact model a calibration artifact was made from."""
    if _hf(path):
        return hf.checkpoint_hash(path)
    path = Path(path)
    recover(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint has no {WEIGHTS}: {path}")
    h = hashlib.sha256()
    with open(weights, "rb") as f:
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
