"""Hugging Face MoE checkpoints (Switch Transformers, OLMoE, Qwen2/3-MoE, Mixtral) through smoe_lab.

    model = smoe_lab.hf.load("google/switch-base-8")     # or a local folder; an HFMoEModel
    cal = calibrate(model, batches)                       # the same smoe_lab.calibrate / reduce_model / finetune
    new, report = reduce_model(model, "uncurl", 4, cal, router="merge")
    smoe_lab.hf.save(new, "switch-base-8-uncurl4")        # loads with SwitchTransformersForConditionalGeneration

smoe_lab.checkpoint.load / save / read_config / load_tokenizer dispatch here for HF folders, hub ids and HF models,
so the CLI and the notebooks take an HF folder or hub id wherever they take a checkpoint. See docs/hf.md.
Importing this package does not import transformers; the functions below do.
"""

from __future__ import annotations

from .io import load as _load
from .io import load_tokenizer as _lt
from .io import read_config as _read
from .io import save as _save
from .source import checkpoint_hash, checkpoint_name, is_hf_folder, is_hf_source, is_hub_id, resolve


def load(path_or_hub_id, device="cpu", dtype="float32"):
    """smoe_lab.hf.io.load: an HFMoEModel in eval mode."""
    return _load(path_or_hub_id, device=device, dtype=dtype)


def save(model, folder, tokenizer=None, train_state=None, **meta):
    """smoe_lab.hf.io.save: a folder the stock from_pretrained loads when D is equal in every layer."""
    return _save(model, folder, tokenizer=tokenizer, train_state=train_state, **meta)


def read_config(path_or_hub_id):
    return _read(path_or_hub_id)


def load_tokenizer(path_or_hub_id):
    return _lt(path_or_hub_id)


def is_hf_model(model) -> bool:
    return getattr(model, "hf_family", None) is not None


__all__ = [
    "checkpoint_hash",
    "checkpoint_name",
    "is_hf_folder",
    "is_hf_model",
    "is_hf_source",
    "is_hub_id",
    "load",
    "load_tokenizer",
    "read_config",
    "resolve",
    "save",
]
