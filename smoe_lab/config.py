"""Validated configuration dataclasses and presets.

Presets come from the paper's Table 6 (model shapes) and Table 7 (MoE + pretraining hyper-parameters),
plus two CPU-sized presets (`tiny`, `small`) that train in minutes on a laptop.

Table 6 prints d_model 1024 / d_ff 4096 for the 124M backbone, but a GPT-2 with 12 layers and d_model 1024
has ~200M parameters; the 124M GPT-2 ("small") is d_model 768, d_ff 3072, 12 heads, 12 layers. We use the
real GPT-2 small shape for `gpt2-124m` and note the discrepancy here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `5e-5` / `1e3` as floats (YAML 1.1 wants a dot: PyYAML returns a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?\d+\.\d*$|^[-+]?\.\d+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def yaml_load(text: str):
    """Parse YAML safely, with scientific-notation floats."""
    return yaml.load(text, Loader=_Loader)


def _fail(cls: str, name: str, msg: str) -> None:
    raise ValueError(f"{cls}.{name}: {msg}")


def _check_positive_int(cls: str, name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(cls, name, f"must be an integer >= {minimum}, got {value!r}")


def _check_number(cls: str, name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(cls, name, f"must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or value > hi:
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        _fail(cls, name, f"must be in {bound}, got {value!r}")


class _FromDict:
    """Shared constructors: from a dict / YAML / JSON, rejecting unknown keys (a typo fails loudly)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}: expected a mapping of fields, got {type(d).__name__} {d!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes):
        return self.from_dict({**self.to_dict(), **changes})


@dataclass
class ModelConfig(_FromDict):
    """GPT-2 decoder with top-1 Switch MoE layers in every `moe_every`-th block, starting with the first.

    num_experts: 1 builds the dense GPT-2 (an SMoE with one expert is exactly a dense FFN: the softmax over
    one logit is 1 and no token is dropped at capacity factor >= 1). An int > 1 puts that many experts in
    every MoE layer; a list gives one count per MoE layer (reduced models, `mcsmoe`), always building MoE layers.

    moe_impl: "native" (smoe_lab.moe.MoELayer) or "deepspeed" (smoe_lab.ds.moe.DeepSpeedMoELayer, built from
    deepspeed.moe.layer.MoE); ep_size: expert-parallel ranks per expert group (deepspeed only; divides every
    layer's expert count); use_rts: DeepSpeed's Random Token Selection when capacity binds (deepspeed only).

    Router options (docs/routers.md; the defaults are the paper's): router_init_std, the std of the router's normal
    init (GPT-2's 0.02; also used when a reduction re-initialises a router); router_z_loss_coef, ST-MoE's router
    z-loss coefficient (Zoph et al. 2022 use 1e-3), added to aux; router_jitter, Switch's multiplicative input
    jitter eps (Fedus et al. 2021 use 1e-2). z-loss and jitter are native-only (moe_impl "native").
    """

    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    vocab_size: int = 4096
    block_size: int = 128
    num_experts: int | list[int] = 1
    moe_every: int = 2
    capacity_factor_train: float = 1.2
    capacity_factor_eval: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    aux_loss_coef: float = 0.01
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    moe_impl: str = "native"  # native | deepspeed
    ep_size: int = 1
    use_rts: bool = False
    router_init_std: float = 0.02
    router_z_loss_coef: float = 0.0
    router_jitter: float = 0.0
    # Provenance of a reduced model: per MoE layer, old expert index -> new expert index (-1 = dropped).
    expert_map: list[list[int]] | None = None

    def __post_init__(self) -> None:
        c = "ModelConfig"
        for name in ("n_layer", "n_head", "d_model", "d_ff", "vocab_size", "block_size", "moe_every"):
            _check_positive_int(c, name, getattr(self, name))
        _check_positive_int(c, "min_capacity", self.min_capacity, minimum=0)
        if self.d_model % self.n_head:
            _fail(c, "d_model", f"must be divisible by n_head={self.n_head}, got {self.d_model}")
        _check_number(c, "capacity_factor_train", self.capacity_factor_train, 0.0, lo_open=True)
        _check_number(c, "capacity_factor_eval", self.capacity_factor_eval, 0.0, lo_open=True)
        _check_number(c, "aux_loss_coef", self.aux_loss_coef, 0.0)
        _check_number(c, "dropout", self.dropout, 0.0, 1.0)
        _check_number(c, "layer_norm_eps", self.layer_norm_eps, 0.0, lo_open=True)
        if not isinstance(self.drop_tokens, bool):
            _fail(c, "drop_tokens", f"must be a bool, got {self.drop_tokens!r}")
        if self.moe_impl not in ("native", "deepspeed"):
            _fail(c, "moe_impl", f"must be 'native' or 'deepspeed', got {self.moe_impl!r}")
        _check_positive_int(c, "ep_size", self.ep_size)
        _check_number(c, "router_init_std", self.router_init_std, 0.0, lo_open=True)
        _check_number(c, "router_z_loss_coef", self.router_z_loss_coef, 0.0)
        _check_number(c, "router_jitter", self.router_jitter, 0.0, 1.0)
        if self.router_jitter >= 1.0:
            _fail(c, "router_jitter", f"must be < 1 (the noise is uniform(1 - eps, 1 + eps)), got {self.router_jitter}")
        for name in ("router_z_loss_coef", "router_jitter"):
            if getattr(self, name) > 0 and self.moe_impl != "native":
                _fail(
                    c,
                    name,
                    f"is native-only (moe_impl 'native'); DeepSpeed's gate has no such option, got {self.moe_impl!r}",
                )
        if not isinstance(self.use_rts, bool):
            _fail(c, "use_rts", f"must be a bool, got {self.use_rts!r}")
        if self.ep_size > 1 and self.moe_impl != "deepspeed":
            _fail(c, "ep_size", f"expert parallelism (ep_size={self.ep_size}) needs moe_impl 'deepspeed'")
        if isinstance(self.num_experts, (list, tuple)):
            self.num_experts = [
                int(e) if isinstance(e, int) and not isinstance(e, bool) else e for e in self.num_experts
            ]
            if len(self.num_experts) != self.n_moe_layers:
                _fail(
                    c,
                    "num_experts",
                    f"a list needs one count per MoE layer ({self.n_moe_layers}), got {len(self.num_experts)}",
                )
            for e in self.num_experts:
                _check_positive_int(c, "num_experts", e)
        else:
            _check_positive_int(c, "num_experts", self.num_experts)
        if self.expert_map is not None:
            if len(self.expert_map) != self.n_moe_layers:
                _fail(c, "expert_map", f"needs one map per MoE layer ({self.n_moe_layers}), got {len(self.expert_map)}")
            for i, (m, e) in enumerate(zip(self.expert_map, self.experts_per_layer)):
                if any((not isinstance(v, int)) or v < -1 or v >= e for v in m):
                    _fail(c, "expert_map", f"layer {i} maps to indices outside [-1, {e})")
        if any(e % self.ep_size for e in self.experts_per_layer):
            counts = self.experts_per_layer
            _fail(c, "ep_size", f"must divide the expert count of every MoE layer {counts}, got {self.ep_size}")

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return isinstance(self.num_experts, list) or self.num_experts > 1

    @property
    def moe_block_indices(self) -> list[int]:
        """Indices of blocks whose FFN is an MoE layer: 0, moe_every, 2*moe_every, ..."""
        return list(range(0, self.n_layer, self.moe_every))

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_block_indices)

    @property
    def experts_per_layer(self) -> list[int]:
        """Expert count of each MoE layer (empty for the dense model)."""
        if isinstance(self.num_experts, list):
            return list(self.num_experts)
        return [self.num_experts] * self.n_moe_layers if self.num_experts > 1 else []

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def label(self) -> str:
        """Human label as in the paper: 'dense', '8e', '(32e->8e)' style per-layer counts."""
        if not self.is_moe:
            return "dense"
        counts = self.experts_per_layer
        return f"{counts[0]}e" if len(set(counts)) == 1 else "[" + ",".join(map(str, counts)) + "]e"

    # -- presets -------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in MODEL_PRESETS:
            raise ValueError(f"ModelConfig.preset: unknown preset {name!r}; known: {sorted(MODEL_PRESETS)}")
        return cls.from_dict({**MODEL_PRESETS[name], **overrides})


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # CPU presets: byte-level BPE vocabularies trained on the shipped corpus keep the output layer small.
    "tiny": dict(n_layer=4, n_head=4, d_model=128, d_ff=512, vocab_size=4096, block_size=128),
    "small": dict(n_layer=6, n_head=8, d_model=256, d_ff=1024, vocab_size=8192, block_size=256),
    # Paper backbones (Table 6), GPT-2 BPE vocabulary. See the module docstring about 124M's width.
    "gpt2-124m": dict(n_layer=12, n_head=12, d_model=768, d_ff=3072, vocab_size=50257, block_size=1024),
    "gpt2-354m": dict(n_layer=24, n_head=16, d_model=1024, d_ff=4096, vocab_size=50257, block_size=1024),
}


@dataclass
class TrainConfig(_FromDict):
    """Optimisation settings. Defaults are the paper's pretraining values (Table 7) except the budget.

    batch_size is the global batch in sequences; micro_batch_size sequences go through the model at once and
    gradients are accumulated over batch_size // micro_batch_size micro-steps.

    engine: "torch" (one process) or "deepspeed" (smoe_lab.ds.engine: data / expert parallel over the ranks of
    the `deepspeed` launcher; accumulation batch_size // micro_batch_size // world_size); zero_stage: DeepSpeed's
    ZeRO stage 0, 1 or 2 (deepspeed engine only; stage 3 is not supported with MoE layers).

    Router optimiser options (docs/routers.md; the defaults are the paper's, both engines honour them): the MoE
    routers' weights get their own AdamW group with learning rate router_lr_mult x the schedule's and weight decay
    router_weight_decay (None = weight_decay).
    """

    max_steps: int = 100
    batch_size: int = 512
    micro_batch_size: int = 16
    lr: float = 5e-5
    min_lr: float = 0.0
    warmup_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 20
    checkpoint_every: int = 0  # 0 = only at the end
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    engine: str = "torch"  # torch | deepspeed
    zero_stage: int = 0
    router_lr_mult: float = 1.0
    router_weight_decay: float | None = None

    def __post_init__(self) -> None:
        c = "TrainConfig"
        for name in ("max_steps", "batch_size", "micro_batch_size", "eval_batches", "log_every"):
            _check_positive_int(c, name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            _check_positive_int(c, name, getattr(self, name), minimum=0)
        if self.batch_size % self.micro_batch_size:
            _fail(
                c,
                "batch_size",
                f"must be a multiple of micro_batch_size={self.micro_batch_size}, got {self.batch_size}",
            )
        _check_number(c, "lr", self.lr, 0.0, lo_open=True)
        _check_number(c, "min_lr", self.min_lr, 0.0, self.lr)
        _check_number(c, "weight_decay", self.weight_decay, 0.0)
        _check_number(c, "beta1", self.beta1, 0.0, 1.0)
        _check_number(c, "beta2", self.beta2, 0.0, 1.0)
        _check_number(c, "eps", self.eps, 0.0, lo_open=True)
        _check_number(c, "grad_clip", self.grad_clip, 0.0)
        _check_number(c, "router_lr_mult", self.router_lr_mult, 0.0, lo_open=True)
        if self.router_weight_decay is not None:
            _check_number(c, "router_weight_decay", self.router_weight_decay, 0.0)
        if self.device not in ("auto", "cpu", "cuda"):
            _fail(c, "device", f"must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            _fail(c, "dtype", f"must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.engine not in ("torch", "deepspeed"):
            _fail(c, "engine", f"must be 'torch' or 'deepspeed', got {self.engine!r}")
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2):
            _fail(c, "zero_stage", f"must be 0, 1 or 2 (ZeRO-3 does not support MoE layers), got {self.zero_stage!r}")

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    def check_schedule(self) -> None:
        """A run must reach its peak lr: warmup_steps > max_steps raises ValueError naming both (a run's config
        is checked when it starts, so the defaults may stand for the paper's 1000-step warmup of a long run)."""
        if self.warmup_steps > self.max_steps:
            _fail(
                "TrainConfig",
                "warmup_steps",
                f"{self.warmup_steps} exceeds max_steps={self.max_steps}: the learning rate would never reach "
                f"lr={self.lr:g} (lower warmup_steps or raise max_steps)",
            )


@dataclass
class PretrainParams(_FromDict):
    """Everything one pretraining run needs: what `smoe-lab pretrain --params FILE` reads (YAML)."""

    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # overrides on the preset
    train: dict[str, Any] = field(default_factory=dict)  # overrides on TrainConfig
    corpus: str = "tiny"  # a recipe name of smoe_lab.data.corpus or a path to a prepared corpus
    num_experts: int | list[int] = 1
    out_dir: str = "runs/pretrain"
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("model", "train"):
            if not isinstance(getattr(self, name), dict):
                _fail("PretrainParams", name, f"must be a mapping of overrides, got {getattr(self, name)!r}")
        if self.preset not in MODEL_PRESETS:
            _fail("PretrainParams", "preset", f"unknown preset {self.preset!r}; known: {sorted(MODEL_PRESETS)}")
        self.model_config()  # validate now, fail loudly
        self.train_config().check_schedule()

    def model_config(self) -> ModelConfig:
        return ModelConfig.preset(self.preset, **{**self.model, "num_experts": self.num_experts})

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.train)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"params file {path} is a folder: give a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        data = yaml_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"params file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"params file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings (values parsed as YAML) into a nested dict; dots make nesting: train.lr=1e-3."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {pair!r}: {p!r} is set to a value and cannot also hold keys")
        try:
            node[parts[-1]] = yaml_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {pair!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged
