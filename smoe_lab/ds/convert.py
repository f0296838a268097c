"""Checkpoint interchange between the native stacked-expert layout and DeepSpeed-MoE layers.

Per MoE block b (prefix `transformer.h.{b}.mlp.`), expert e:

    native                      DeepSpeed-MoE (deepspeed.moe.layer.MoE, smoe_lab.ds.moe.DeepSpeedMoELayer)
    router.weight   [E, C]      deepspeed_moe.gate.wg.weight                               [E, C]
    experts.w_in[e] [C, F]      deepspeed_moe.experts.deepspeed_experts.{e}.0.weight       [F, C]  (transposed)
    experts.b_in[e] [F]         deepspeed_moe.experts.deepspeed_experts.{e}.0.bias         [F]
    experts.w_out[e] [F, C]     deepspeed_moe.experts.deepspeed_experts.{e}.2.weight       [C, F]  (transposed)
    experts.b_out[e] [C]        deepspeed_moe.experts.deepspeed_experts.{e}.2.bias         [C]

Everything else is shared. A DeepSpeed model under expert parallelism holds experts ep_rank * E_local + j as
local ids j; state dicts here use global ids unless a function says otherwise.

Three sources and two targets:
- a smoe_lab checkpoint folder in the native layout (what the rest of the workbench reads and writes);
- a smoe_lab checkpoint folder in the DeepSpeed layout (`--to deepspeed`: config moe_impl deepspeed, all experts
  with global ids; `checkpoint.load` builds it when ep_size is 1, `load_as_deepspeed` for any ep_size);
- a DeepSpeed engine checkpoint (`engine.save_checkpoint`): `<dir>/<tag>/mp_rank_00_model_states.pt` (the
  non-expert weights under "module", routers included) plus one `layer_{L}_expert_{E}_mp_rank_00_model_states.pt`
  per MoE layer L and global expert E, read with torch.load(weights_only=True) (nothing is unpickled). The
  ModelConfig comes from the client state that smoe_lab.ds.engine writes (`smoe_model_config`) or is passed in.

    smoe-lab convert --from native|deepspeed|deepspeed-engine --to native|deepspeed --checkpoint C --out O
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from .. import checkpoint
from ..config import ModelConfig, yaml_load
from ..model import GPT

DS_ROUTER = "deepspeed_moe.gate.wg.weight"
DS_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
# native stacked name -> (Linear index in the expert Sequential, attribute, transposed)
NATIVE_TO_DS = {
    "w_in": (0, "weight", True),
    "b_in": (0, "bias", False),
    "w_out": (2, "weight", True),
    "b_out": (2, "bias", False),
}
DS_TO_NATIVE = {(lin, attr): (name, tr) for name, (lin, attr, tr) in NATIVE_TO_DS.items()}
_DS_EXPERT_KEY = re.compile(r"^deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.([02])\.(weight|bias)$")
FORMATS_FROM = ("native", "deepspeed", "deepspeed-engine")
FORMATS_TO = ("native", "deepspeed")
MODEL_STATES = "mp_rank_00_model_states.pt"


# -- configs ------------------------------------------------------------------------------------------------------
def native_config(cfg: ModelConfig) -> ModelConfig:
    return cfg.replace(moe_impl="native", ep_size=1)


def deepspeed_config(cfg: ModelConfig, ep_size: int = 1, use_rts: bool | None = None) -> ModelConfig:
    return cfg.replace(moe_impl="deepspeed", ep_size=ep_size, use_rts=cfg.use_rts if use_rts is None else use_rts)


def moe_prefixes(cfg: ModelConfig) -> list[str]:
    """State-dict prefix of every MoE layer, in depth order."""
    return [f"transformer.h.{b}.mlp." for b in cfg.moe_block_indices] if cfg.is_moe else []


def _split_key(key: str, prefixes: list[str]) -> tuple[int, str] | None:
    """(MoE layer index, the rest of the key) for a key inside an MoE layer, else None."""
    for i, p in enumerate(prefixes):
        if key.startswith(p):
            return i, key[len(p) :]
    return None


# -- state dicts --------------------------------------------------------------------------------------------------
def native_to_deepspeed_state(
    state: dict[str, Tensor], cfg: ModelConfig, ep_rank: int = 0, ep_size: int = 1
) -> dict[str, Tensor]:
    """Native-layout state -> DeepSpeed layout. ep_size 1: every expert (global ids); else rank ep_rank's slice
    renumbered to local ids 0..E/ep_size-1, as a model built at that ep_size holds them."""
    prefixes = moe_prefixes(cfg)
    out: dict[str, Tensor] = {}
    for key, v in state.items():
        hit = _split_key(key, prefixes)
        if hit is None:
            out[key] = v
            continue
        i, rest = hit
        p = prefixes[i]
        if rest == "router.weight":
            out[p + DS_ROUTER] = v
            continue
        name = rest.removeprefix("experts.")
        if name not in NATIVE_TO_DS:
            raise ValueError(f"native state has an unexpected MoE key {key!r} (is it in the DeepSpeed layout?)")
        lin, attr, transposed = NATIVE_TO_DS[name]
        if v.shape[0] % ep_size:
            raise ValueError(f"{key}: {v.shape[0]} experts do not split over ep_size={ep_size}")
        local = v.shape[0] // ep_size
        for j in range(local):
            t = v[ep_rank * local + j]
            out[f"{p}{DS_EXPERT_PREFIX}{j}.{lin}.{attr}"] = (t.T if transposed else t).contiguous()
    return out


def deepspeed_to_native_state(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """DeepSpeed-layout state with EVERY expert (global ids) -> native layout (stacked experts)."""
    prefixes = moe_prefixes(cfg)
    counts = cfg.experts_per_layer
    out: dict[str, Tensor] = {}
    parts: list[dict[tuple[int, int, str], Tensor]] = [{} for _ in prefixes]
    for key, v in state.items():
        hit = _split_key(key, prefixes)
        if hit is None:
            out[key] = v
            continue
        i, rest = hit
        if rest == DS_ROUTER:
            out[prefixes[i] + "router.weight"] = v
            continue
        m = _DS_EXPERT_KEY.match(rest)
        if m is None:
            raise ValueError(f"DeepSpeed state has an unexpected MoE key {key!r} (is it in the native layout?)")
        parts[i][(int(m.group(1)), int(m.group(2)), m.group(3))] = v
    for i, (p, e) in enumerate(zip(prefixes, counts)):
        have = {k[0] for k in parts[i]}
        if have != set(range(e)):
            missing = sorted(set(range(e)) - have)[:8]
            raise ValueError(
                f"MoE layer {i} ({p}) needs experts 0..{e - 1}, missing {missing}: a rank-local state dict under "
                "expert parallelism? Gather it (gather_native_state) or read the engine checkpoint"
            )
        if p + "router.weight" not in out:
            raise ValueError(f"MoE layer {i} ({p}) has no router ({p}{DS_ROUTER})")
        for (lin, attr), (name, transposed) in DS_TO_NATIVE.items():
            ts = [parts[i][(k, lin, attr)] for k in range(e)]
            out[f"{p}experts.{name}"] = torch.stack([t.T if transposed else t for t in ts]).contiguous()
    return out


def _float_cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}


class StateModel:
    """What checkpoint.save reads from a model (`.state_dict()`, `.config`), for a state that has no model:
    conversions of large checkpoints never build (and randomly initialise) a GPT."""

    def __init__(self, state: dict[str, Tensor], config: ModelConfig):
        self._state, self.config = state, config

    def state_dict(self) -> dict[str, Tensor]:
        return self._state


# -- models -------------------------------------------------------------------------------------------------------
def _ep_rank(ep_size: int) -> int:
    from .moe import expert_parallel_rank

    return expert_parallel_rank(ep_size)


def _load_into(cfg: ModelConfig, state: dict[str, Tensor], where: str):
    """A new GPT(cfg) holding `state` (a tied lm_head may be absent, as in saved checkpoints)."""
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{where} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def to_deepspeed(model, ep_size: int = 1, use_rts: bool | None = None):
    """A native GPT -> a new GPT with DeepSpeed-MoE layers (this rank's experts when ep_size > 1)."""
    if model.config.moe_impl != "native":
        raise ValueError(f"to_deepspeed: the model's moe_impl is {model.config.moe_impl!r}, not 'native'")
    cfg = deepspeed_config(model.config, ep_size, use_rts)
    state = native_to_deepspeed_state(model.state_dict(), model.config, _ep_rank(ep_size), ep_size)
    new = _load_into(cfg, state, "to_deepspeed")
    return new.to(next(model.parameters()).device).train(model.training)


def to_native(model):
    """A GPT with DeepSpeed-MoE layers holding every expert (ep_size 1) -> a new native GPT."""
    if model.config.moe_impl != "deepspeed":
        raise ValueError(f"to_native: the model's moe_impl is {model.config.moe_impl!r}, not 'deepspeed'")
    if model.config.ep_size > 1:
        raise ValueError("to_native: an expert-parallel model holds a slice of the experts; use gather_native_state")
    cfg = native_config(model.config)
    new = _load_into(cfg, deepspeed_to_native_state(model.state_dict(), model.config), "to_native")
    return new.to(next(model.parameters()).device).train(model.training)


@torch.no_grad()
def gather_native_state(model) -> dict[str, Tensor] | None:
    """The model's full state in the native layout, float32 on the CPU. Collective under expert parallelism.

    DeepSpeed-MoE layers with ep_size > 1 hold a slice of the experts: the ranks of the first expert-parallel group
    (ranks 0..ep_size-1, which includes rank 0) all-gather them; every other rank returns None at once.
    """
    from .moe import DeepSpeedMoELayer

    cfg = model.config
    state = dict(model.state_dict())
    if cfg.moe_impl == "native":
        return _float_cpu(state)
    ep = cfg.ep_size
    if ep > 1:
        from deepspeed.utils import groups

        if torch.distributed.get_rank() >= ep:
            return None
        for name, layer in model.named_modules():
            if not isinstance(layer, DeepSpeedMoELayer):
                continue
            group = groups._get_expert_parallel_group(layer.expert_group_name)
            local = layer.num_local_experts
            for j in range(local):
                for lin in (0, 2):
                    for attr in ("weight", "bias"):
                        key = f"{name}.{DS_EXPERT_PREFIX}{j}.{lin}.{attr}"
                        t = state.pop(key).contiguous()
                        parts = [torch.empty_like(t) for _ in range(ep)]
                        torch.distributed.all_gather(parts, t, group=group)
                        for r, part in enumerate(parts):
                            state[f"{name}.{DS_EXPERT_PREFIX}{r * local + j}.{lin}.{attr}"] = part.cpu()
    return _float_cpu(deepspeed_to_native_state(state, cfg))


# -- smoe_lab checkpoint folders ----------------------------------------------------------------------------------
def read_native_state(path: str | Path) -> tuple[dict[str, Tensor], ModelConfig, dict[str, Any]]:
    """(native-layout state, native config, meta) of a smoe_lab checkpoint folder in either layout."""
    cfg, meta = checkpoint.read_config(path)
    weights = Path(path) / checkpoint.WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint has no {checkpoint.WEIGHTS}: {path}")
    state = load_file(str(weights), device="cpu")
    if cfg.moe_impl == "deepspeed":
        state = deepspeed_to_native_state(state, cfg)
    return state, native_config(cfg), meta


def load_as_native(path: str | Path, device: str | torch.device = "cpu"):
    """A smoe_lab checkpoint in either layout -> native GPT (eval mode)."""
    state, cfg, meta = read_native_state(path)
    model = _load_into(cfg, state, f"checkpoint {path}")
    model.checkpoint_meta, model.checkpoint_path = meta, str(path)
    return model.to(device).eval()


def load_as_deepspeed(
    path: str | Path, ep_size: int = 1, use_rts: bool | None = None, device: str | torch.device = "cpu"
):
    """A smoe_lab checkpoint in either layout -> GPT with DeepSpeed-MoE layers holding this rank's experts.

    The way to continue training a (reduced) native checkpoint with the DeepSpeed engine at any ep_size.
    """
    state, cfg, meta = read_native_state(path)
    ds_cfg = deepspeed_config(cfg, ep_size, use_rts)
    ds_state = native_to_deepspeed_state(state, cfg, _ep_rank(ep_size), ep_size)
    model = _load_into(ds_cfg, ds_state, f"checkpoint {path}")
    model.checkpoint_meta, model.checkpoint_path = meta, str(path)
    return model.to(device).eval()


# -- DeepSpeed engine checkpoints -----------------------------------------------------------------------------------
@dataclass
class EngineCheckpoint:
    """A DeepSpeed engine checkpoint read back: DeepSpeed-layout weights with global expert ids."""

    state: dict[str, Tensor]
    tag: str
    path: str
    config: ModelConfig | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)


def engine_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """The folder holding mp_rank_00_model_states.pt: `path/tag`, `path/<latest>` or `path` itself."""
    path = Path(path)
    if tag is not None:
        d = path / tag
    elif (path / MODEL_STATES).is_file():
        d = path
    elif (path / "latest").is_file():
        d = path / (path / "latest").read_text().strip()
    else:
        raise FileNotFoundError(f"not a DeepSpeed engine checkpoint (no {MODEL_STATES} and no 'latest' file): {path}")
    if not (d / MODEL_STATES).is_file():
        raise FileNotFoundError(f"DeepSpeed engine checkpoint has no {MODEL_STATES}: {d}")
    return d


def _torch_load(f: Path) -> Any:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error names a class that weights_only refuses to build
        raise ValueError(f"cannot read {f} with torch.load(weights_only=True): {str(e).splitlines()[0]}") from e


def read_engine_checkpoint(
    path: str | Path, tag: str | None = None, config: ModelConfig | None = None
) -> EngineCheckpoint:
    """Model weights of a DeepSpeed engine checkpoint (non-expert file + every per-expert file), no optimizer."""
    d = engine_tag_dir(path, tag)
    states = _torch_load(d / MODEL_STATES)
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise ValueError(f"{d / MODEL_STATES} holds no 'module' state dict")
    state: dict[str, Tensor] = dict(states["module"])
    expert_files = sorted(d.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    for f in expert_files:
        part = _torch_load(f)
        if not isinstance(part, dict):
            raise ValueError(f"{f} holds no state dict")
        state.update(part)
    if config is None and isinstance(states.get("smoe_model_config"), dict):
        config = ModelConfig.from_dict(states["smoe_model_config"])
    client = {k: v for k, v in states.items() if k.startswith("smoe_")}
    meta = states.get("smoe_meta") if isinstance(states.get("smoe_meta"), dict) else {}
    return EngineCheckpoint(state, d.name, str(d), config, meta, client)


def _engine_config(ck: EngineCheckpoint) -> ModelConfig:
    if ck.config is None:
        raise ValueError(
            f"DeepSpeed engine checkpoint {ck.path} carries no smoe_model_config (not written by smoe_lab): "
            "pass the model's config (--config CONFIG.json or a smoe_lab checkpoint folder)"
        )
    return ck.config


def engine_native_state(ck: EngineCheckpoint) -> tuple[dict[str, Tensor], ModelConfig]:
    """(native-layout float32 state, native config); a run with native MoE layers is already in that layout."""
    cfg = _engine_config(ck)
    state = ck.state if cfg.moe_impl == "native" else deepspeed_to_native_state(ck.state, cfg)
    return _float_cpu(state), native_config(cfg)


def load_engine_checkpoint(path: str | Path, tag: str | None = None, config: ModelConfig | None = None):
    """A DeepSpeed engine checkpoint -> native GPT (eval mode), ready for calibrate / reduce / finetune."""
    ck = read_engine_checkpoint(path, tag, config)
    state, cfg = engine_native_state(ck)
    model = _load_into(cfg, state, f"DeepSpeed checkpoint {ck.path}")
    model.checkpoint_meta, model.checkpoint_path = ck.meta, ck.path
    return model.eval()


def read_model_config(spec: str | Path) -> ModelConfig:
    """A ModelConfig from a smoe_lab checkpoint folder, its config.json, or a JSON/YAML file of fields."""
    p = Path(spec)
    if p.is_dir():
        return checkpoint.read_config(p)[0]
    if not p.is_file():
        raise FileNotFoundError(f"model config not found: {p}")

    doc = yaml_load(p.read_text())
    if isinstance(doc, dict) and "model_config" in doc:
        doc = doc["model_config"]
    if not isinstance(doc, dict):
        raise ValueError(f"{p} holds no mapping of ModelConfig fields")
    return ModelConfig.from_dict(doc)


def _try_tokenizer(path: str | Path | None):
    """The tokenizer of a smoe_lab checkpoint folder, or None when there is none to copy."""
    if path is None or not Path(path).is_dir():
        return None
    try:
        return checkpoint.load_tokenizer(path)
    except FileNotFoundError:
        return None


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    src_format: str,
    dst_format: str,
    ep_size: int = 1,
    tag: str | None = None,
    config: str | Path | ModelConfig | None = None,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write `src` (native | deepspeed | deepspeed-engine) as a smoe_lab checkpoint folder `out` in the native or
    DeepSpeed layout (the latter recording ep_size). No model is built: tensors are only renamed and stacked."""
    if src_format not in FORMATS_FROM:
        raise ValueError(f"convert: --from must be one of {list(FORMATS_FROM)}, got {src_format!r}")
    if dst_format not in FORMATS_TO:
        raise ValueError(f"convert: --to must be one of {list(FORMATS_TO)}, got {dst_format!r}")
    if src_format == dst_format:
        raise ValueError(f"convert: --from and --to are both {src_format!r}: nothing to convert")
    if isinstance(config, (str, Path)):
        config = read_model_config(config)
    if src_format == "deepspeed-engine":
        ck = read_engine_checkpoint(src, tag, config)
        state, cfg = engine_native_state(ck)
        meta = dict(ck.meta)
        origin = {"path": str(src), "format": src_format, "tag": ck.tag}
    else:
        have, _ = checkpoint.read_config(src)
        if have.moe_impl != src_format and have.is_moe:
            raise ValueError(
                f"convert: {src} is in the {have.moe_impl} layout, not {src_format} (--from {have.moe_impl})"
            )
        state, cfg, meta = read_native_state(src)
        origin = {"path": str(src), "format": src_format}
    if dst_format == "deepspeed":
        cfg_out = deepspeed_config(cfg, ep_size)
        state = native_to_deepspeed_state(state, cfg)
    else:
        cfg_out = cfg
    if tokenizer_from is None:
        tokenizer_from = ck.client.get("smoe_project_checkpoint") if src_format == "deepspeed-engine" else src
    tok = _try_tokenizer(tokenizer_from)
    meta = {**meta, "converted_from": origin}
    return checkpoint.save(StateModel(state, cfg_out), out, tokenizer=tok, **meta)
