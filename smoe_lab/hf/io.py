"""Loading and saving Hugging Face MoE models: the stock `from_pretrained` / `save_pretrained` layout.

A folder written by `save` is a plain transformers folder (config.json, model.safetensors in the model's own
checkpoint key layout, the tokenizer's files) that the stock `from_pretrained` of the same class loads when every
MoE layer has the same expert count D (the config's count is D, top-k lowered to at most D). With different D per
layer the config also lists `smoe_lab_experts_per_layer`; the stock class cannot build that, `load` can (it builds
the model with each block resized before the weights are read, through transformers' own loader).

Beside the transformers files, `smoe_lab.json` keeps what smoe_lab adds: the family, experts per layer, the expert
map of a reduction and the run's meta (what smoe_lab.checkpoint keeps in its own config.json), and train_state.pt
the optimizer state of a finetuning run (torch.load with weights_only=True).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_dir
from . import families as fm
from .model import HFConfig, HFMoEModel, sync_config
from .source import RECORD, resolve
from .tokenizer import HFTokenizer

FORMAT = "smoe_lab.hf.v1"
TRAIN_STATE = "train_state.pt"
_CLASSES: dict[tuple[str, tuple[int, ...]], type] = {}


def _record(folder: Path) -> dict[str, Any]:
    f = folder / RECORD
    if not f.is_file():
        return {}
    doc = json.loads(f.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{f} is not a smoe_lab.hf record (format {doc.get('format')!r})")
    return doc


def _hf_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def model_class(config, fam: fm.Family | None = None) -> type:
    """The transformers class to build: the config's architecture when the family drives it, else the family's
    default (e.g. a folder saved from OlmoeModel still loads as OlmoeForCausalLM, with a fresh LM head)."""
    import transformers

    fam = fam or fm.family_for(config)
    names = [a for a in (getattr(config, "architectures", None) or []) if a in fam.architectures]
    cls = getattr(transformers, (names or list(fam.architectures))[0])
    counts = getattr(config, "smoe_lab_experts_per_layer", None)
    return per_layer_class(cls, fam, tuple(counts)) if counts else cls


def per_layer_class(cls: type, fam: fm.Family, counts: tuple[int, ...]) -> type:
    """A subclass of `cls` (same name, so config.architectures is unchanged) whose MoE blocks are resized to
    counts[i] experts right after construction: transformers' own loader then fills them from the checkpoint."""
    key = (cls.__qualname__, counts)
    if key in _CLASSES:
        return _CLASSES[key]

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        blocks = fm.moe_blocks(fam, self)
        if len(blocks) != len(counts):
            raise ValueError(f"smoe_lab_experts_per_layer lists {len(counts)} layers, the model has {len(blocks)}")
        k = fm.top_k(fam, config)
        for (_, _, moe), d in zip(blocks, counts):
            cfg = copy.deepcopy(config)
            fm.set_expert_count(fam, cfg, d, k)
            router, experts = fm.get_path(moe, fam.router_module), fm.get_path(moe, fam.experts)
            fm.set_path(moe, fam.router_module, type(router)(cfg))
            fm.set_path(moe, fam.experts, type(experts)(cfg))
            if hasattr(moe, "top_k"):
                moe.top_k = min(k, d)

    sub = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    _CLASSES[key] = sub
    return sub


def _dtype(dtype):
    if dtype in (None, "auto"):
        return "auto"
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load(path_or_hub_id, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32") -> HFMoEModel:
    """A Hugging Face MoE model (folder or hub id) as an HFMoEModel, in eval mode.

    dtype: float32 by default (smoe_lab trains in fp32 with bf16 autocast on CUDA); "auto" keeps the checkpoint's.
    """
    folder = resolve(path_or_hub_id)
    config = _hf_config(folder)
    fam = fm.family_for(config)
    record = _record(folder)
    hf_model = model_class(config, fam).from_pretrained(str(folder), dtype=_dtype(dtype))
    model = HFMoEModel(hf_model, expert_map=record.get("expert_map"))
    model.checkpoint_meta = record.get("meta", {})
    model.checkpoint_path = str(folder)
    return model.to(device).eval()


def read_config(path_or_hub_id) -> tuple[HFConfig, dict[str, Any]]:
    """(HFConfig, meta) of a folder without reading its weights (the model is built on the meta device)."""
    folder = resolve(path_or_hub_id)
    config = _hf_config(folder)
    record = _record(folder)
    with torch.device("meta"):
        hf_model = model_class(config)(config)
    model = HFMoEModel(hf_model, expert_map=record.get("expert_map"))
    return model.config, record.get("meta", {})


def save(
    model: HFMoEModel,
    folder: str | Path,
    tokenizer: Any = None,
    train_state: dict[str, Any] | None = None,
    **meta: Any,
) -> Path:
    """Write `model` as a transformers folder (atomically; see the module docstring); returns the folder."""
    if not isinstance(model, HFMoEModel):
        raise ValueError(f"smoe_lab.hf.save takes a model from smoe_lab.hf.load, got {type(model).__name__}")
    folder = Path(folder)
    counts = model.config.experts_per_layer
    sync_config(model.family, model.hf, counts, fm.top_k(model.family, model.hf.config))
    with atomic_dir(folder) as tmp:
        model.hf.save_pretrained(str(tmp))
        if tokenizer is not None:
            if not isinstance(tokenizer, HFTokenizer):
                raise ValueError(
                    f"a Hugging Face model is saved with its own tokenizer, got {type(tokenizer).__name__}"
                )
            tokenizer.save(tmp)
        doc = {
            "format": FORMAT,
            "family": model.family.name,
            "experts_per_layer": counts,
            "expert_map": model.expert_map,
            "meta": meta,
        }
        (tmp / RECORD).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
    return folder


def load_tokenizer(path_or_hub_id) -> HFTokenizer:
    """The model's own tokenizer (AutoTokenizer of the folder), behind smoe_lab's tokenizer interface."""
    from transformers import AutoTokenizer

    folder = resolve(path_or_hub_id)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"Hugging Face folder {folder} has no usable tokenizer ({e})") from None
    return HFTokenizer(tok, name=str(path_or_hub_id))
