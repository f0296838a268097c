"""A transformers MoE model seen through smoe_lab's interface (`moe_layers()`, `model(idx, targets, mask)`).

`HFMoEModel` wraps a stock transformers model (its weights, classes and checkpoint layout are untouched) and gives
the calibration, reduction, finetuning and evaluation code what it reads from the native GPT:

    moe_layers()                 one HFMoELayer per MoE block in depth order (Switch: encoder blocks, then decoder)
    layer.router.weight          [E, d_model]: Switch's `router.classifier`, the decoders' `gate`
    layer.num_experts, .top_k    E and k of that block
    layer.expert_weights()       the experts as GatedExpertWeights / BiasFreeExpertWeights (smoe_lab.hf.experts)
    layer.telemetry, .aux_loss   routing statistics of the last forward, recorded by a forward hook on the router's
                                 linear map (never from output_router_logits; see smoe_lab.hf.routing)
    model(idx)                   logits [B, T, V];  model(idx, targets, mask) -> (logits, loss, aux) as GPT's
    model.config                 HFConfig: the ModelConfig fields smoe_lab reads (block_size, vocab_size, ...)

Causal decoders take the ids as they are (plus BOS in front when the family's tokenizer starts sequences with
one). Switch Transformers (encoder-decoder) read smoe_lab's causal rows as described in smoe_lab.hf.seq2seq: the
encoder gets the prompt, the decoder predicts the answer, and the decoder logits come back at the causal positions.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import families as fm
from .experts import read_experts, write_experts
from .routing import balance_loss, route_switch, route_topk, telemetry, z_loss
from .seq2seq import from_causal, from_tokens


@dataclass
class HFConfig:
    """The model facts smoe_lab reads from `model.config`, for a Hugging Face model (names as ModelConfig's)."""

    family: str
    model_type: str
    architecture: str
    num_experts: list[int]  # per MoE layer, depth order
    top_k: list[int]  # per MoE layer
    moe_block_indices: list[int]  # block of each MoE layer in depth order (decoder blocks follow the encoder's)
    block_size: int  # longest input the adapter accepts
    vocab_size: int
    aux_loss_coef: float
    z_loss_coef: float = 0.0
    expert_capacity: int | None = None  # Switch: tokens an expert may take per sequence
    expert_map: list[list[int]] | None = None  # provenance of a reduced model, as ModelConfig.expert_map
    is_encoder_decoder: bool = False
    capacity_factor_eval: float | None = None  # HF models have no capacity factor (Switch: expert_capacity)
    tie_embeddings: bool = False  # smoe_lab's checkpoint code must keep every key of an HF state dict

    @property
    def experts_per_layer(self) -> list[int]:
        return list(self.num_experts)

    @property
    def is_moe(self) -> bool:
        return True

    @property
    def n_moe_layers(self) -> int:
        return len(self.num_experts)

    def label(self) -> str:
        c = self.num_experts
        return f"{c[0]}e" if len(set(c)) == 1 else "[" + ",".join(map(str, c)) + "]e"

    def to_dict(self) -> dict:
        return asdict(self)


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


class HFMoELayer:
    """One MoE block of a transformers model as smoe_lab sees an MoE layer (a view: it owns no parameters)."""

    def __init__(self, owner: HFMoEModel, moe: nn.Module, stack: str, block: int, path: str):
        self.owner, self.moe, self.stack, self.block = owner, moe, stack, block
        self.path = path  # of the MoE block inside the transformers model, e.g. "encoder.block.1.layer.-1.mlp"
        self.fam: fm.Family = owner.family
        self.telemetry = None
        self.aux_loss: Tensor | None = None  # load-balancing loss of the last forward (coefficient not applied)
        self.z_loss: Tensor | None = None
        self.record_logits = True
        self._handle = None

    # -- structure -----------------------------------------------------------------------------------------------
    @property
    def router(self) -> nn.Module:
        """The routing linear map: `.weight` [E, d_model]."""
        return fm.get_path(self.moe, self.fam.router)

    @property
    def router_module(self) -> nn.Module:
        return fm.get_path(self.moe, self.fam.router_module)

    @property
    def experts(self) -> nn.Module:
        return fm.get_path(self.moe, self.fam.experts)

    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0]

    @property
    def top_k(self) -> int:
        return 1 if self.fam.top_k_field is None else int(self.router_module.top_k)

    @property
    def normalize(self) -> bool:
        n = self.fam.norm_topk
        return n if isinstance(n, bool) else bool(getattr(self.router_module, n, False))

    @property
    def capacity(self) -> int:
        return int(self.router_module.expert_capacity) if self.fam.capacity_field else 0

    def expert_weights(self):
        """[E] NamedTuples (GatedExpertWeights or BiasFreeExpertWeights), detached views of the weights."""
        return read_experts(self.fam, self.experts)

    @torch.no_grad()
    def set_experts(self, weights, router_weight: Tensor) -> None:
        """Write D experts and the router weight [D, d_model] (the block must already hold D experts)."""
        write_experts(self.fam, self.experts, weights)
        self.router.weight.copy_(router_weight)

    def expert_params(self) -> int:
        """Parameters of one expert."""
        return sum(t.numel() for t in self.expert_weights()[0])

    # -- telemetry -----------------------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handle is None:
            self._handle = self.router.register_forward_hook(self._on_router)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _on_router(self, module: nn.Module, args, output) -> None:
        """Forward hook on the routing linear map: logits -> the model's own routing -> telemetry and aux loss."""
        x = args[0]
        if isinstance(module, nn.Linear):
            logits = output
        else:  # a TopKRouter: recompute its linear map (what it returns differs between transformers releases)
            logits = F.linear(x.reshape(-1, x.shape[-1]), module.weight, getattr(module, "bias", None))
        e = logits.shape[-1]
        if self.fam.capacity_field:
            lg = logits.reshape(-1, logits.shape[-2], e) if logits.dim() == 3 else logits.reshape(1, -1, e)
            r = route_switch(lg, self.capacity)
        else:
            r = route_topk(logits.reshape(-1, e), self.top_k, self.normalize)
        flat = logits.reshape(-1, e)
        valid = self.owner._stat_mask(self.stack, flat.shape[0])
        sub = r if valid is None else type(r)(r.probs[valid], r.index[valid], r.weight[valid], r.kept[valid])
        self.aux_loss = balance_loss(sub)
        self.z_loss = z_loss(flat if valid is None else flat[valid])
        self.telemetry = telemetry(flat, r, valid, self.capacity, self.record_logits)


class HFMoEModel(nn.Module):
    """A transformers MoE model (`.hf`) with smoe_lab's interface; see the module docstring."""

    def __init__(self, hf_model: nn.Module, expert_map: list[list[int]] | None = None):
        super().__init__()
        self.hf = hf_model
        self.family = fm.family_for(hf_model.config)
        if type(hf_model).__name__ not in self.family.architectures:
            raise ValueError(
                f"{type(hf_model).__name__} is not a model with an LM head that smoe_lab drives; "
                f"load {list(self.family.architectures)} for model_type {hf_model.config.model_type!r}"
            )
        self.expert_map = expert_map
        self.checkpoint_meta: dict = {}
        self.checkpoint_path: str | None = None
        self._stats: dict[str, Tensor] = {}
        offsets, start = {}, 0
        for stack, n in fm.num_blocks(self.family, hf_model).items():
            offsets[stack], start = start, start + n
        self._layers = [
            HFMoELayer(self, moe, stack, offsets[stack] + i, f"{stack}.{i}.{self.family.moe}")
            for stack, i, moe in fm.moe_blocks(self.family, hf_model)
        ]
        if not self._layers:
            raise ValueError(
                f"{type(hf_model).__name__} has no MoE blocks: nothing for smoe_lab to calibrate or reduce"
            )
        for layer in self._layers:
            layer.attach()
        cfg = hf_model.config
        self.eos_id = _first(cfg.eos_token_id)
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else self.eos_id
        start_id = getattr(cfg, "decoder_start_token_id", None)
        self.start_id = start_id if start_id is not None else self.pad_id
        self.bos_id = _first(cfg.bos_token_id) if self.family.prepend_bos else None
        if self.family.seq2seq and (self.eos_id is None or self.pad_id is None):
            raise ValueError("an encoder-decoder model needs eos_token_id and pad_token_id in its config")
        if self.family.prepend_bos and self.bos_id is None:
            raise ValueError(f"{cfg.model_type} starts sequences with BOS but its config has no bos_token_id")

    # -- what smoe_lab reads ---------------------------------------------------------------------------------------
    @property
    def hf_family(self) -> str:
        return self.family.name

    @property
    def scores_from_targets(self) -> bool:
        """Rank classification must pass the targets: an encoder-decoder model needs to know where answers start."""
        return self.family.seq2seq

    @property
    def config(self) -> HFConfig:
        cfg, fam = self.hf.config, self.family
        extra = 1 if self.bos_id is not None else 0
        return HFConfig(
            family=fam.name,
            model_type=cfg.model_type,
            architecture=type(self.hf).__name__,
            num_experts=[m.num_experts for m in self._layers],
            top_k=[m.top_k for m in self._layers],
            moe_block_indices=[m.block for m in self._layers],
            block_size=fm.max_length(fam, cfg) - extra,
            vocab_size=int(cfg.vocab_size),
            aux_loss_coef=float(getattr(cfg, fam.aux_coef_field, 0.0) or 0.0),
            z_loss_coef=float(getattr(cfg, fam.z_coef_field, 0.0) or 0.0) if fam.z_coef_field else 0.0,
            expert_capacity=self._layers[0].capacity if fam.capacity_field else None,
            expert_map=self.expert_map,
            is_encoder_decoder=fam.seq2seq,
        )

    def moe_layers(self) -> list[HFMoELayer]:
        """MoE layers in depth order (Switch: encoder blocks before decoder blocks)."""
        return self._layers

    def telemetry(self):
        return [m.telemetry for m in self._layers]

    def set_record_logits(self, on: bool) -> None:
        for m in self._layers:
            m.record_logits = on

    def aux_loss(self) -> Tensor:
        """sum over MoE layers of aux_coef * load-balancing loss (+ z_coef * z-loss for Switch), last forward."""
        cfg = self.config
        total = torch.zeros((), device=next(self.hf.parameters()).device)
        for m in self._layers:
            if m.aux_loss is not None:
                total = total + cfg.aux_loss_coef * m.aux_loss + cfg.z_loss_coef * m.z_loss
        return total

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.hf.parameters())
        if non_embedding:
            n -= self.hf.get_input_embeddings().weight.numel()
        return n

    def num_active_params(self) -> int:
        """Parameters touched per token: each MoE layer counts its top-k experts (and its router)."""
        return self.num_params() - sum(m.expert_params() * (m.num_experts - m.top_k) for m in self._layers)

    def _stat_mask(self, stack: str, n: int) -> Tensor | None:
        """Which of the n router rows of `stack` are real tokens in the current forward (None: all)."""
        m = self._stats.get(stack)
        return m if m is not None and m.numel() == n else None

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, idx: Tensor, targets: Tensor | None = None, mask: Tensor | None = None):
        """GPT's contract: logits [B, T, V] (logits[:, t] scores targets[:, t]); with targets (logits, loss, aux)."""
        if idx.dim() != 2:
            raise ValueError(f"token ids must be [B, T], got shape {tuple(idx.shape)}")
        if self.family.seq2seq:
            return self._forward_seq2seq(idx, targets, mask)
        return self._forward_causal(idx, targets, mask)

    def _run(self, stats: dict[str, Tensor], **inputs):
        self._stats = stats
        try:
            return self.hf(**inputs, use_cache=False).logits
        finally:
            self._stats = {}

    def _forward_causal(self, idx, targets, mask):
        real = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask.bool()
        ids, att = idx, None if mask is None else mask.long()
        if self.bos_id is not None:
            col = torch.full_like(idx[:, :1], self.bos_id)
            ids = torch.cat([col, idx], 1)
            att = torch.cat([torch.ones_like(col), torch.ones_like(idx) if att is None else att], 1)
            real = torch.cat([torch.zeros_like(col, dtype=torch.bool), real], 1)
        logits = self._run({self.family.stacks[0]: real.reshape(-1)}, input_ids=ids, attention_mask=att)
        if self.bos_id is not None:
            logits = logits[:, 1:]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss, self.aux_loss()

    def _forward_seq2seq(self, idx, targets, mask):
        dev = idx.device
        if targets is None:
            b = from_tokens(idx, mask, self.eos_id, self.start_id, self.pad_id)
        else:
            b = from_causal(idx, targets, mask, self.eos_id, self.start_id, self.pad_id)
        enc, dec = self.family.stacks
        stats = {enc: b.encoder_stats.reshape(-1).to(dev), dec: b.decoder_attention_mask.bool().reshape(-1).to(dev)}
        out = self._run(
            stats,
            input_ids=b.input_ids.to(dev),
            attention_mask=b.attention_mask.to(dev),
            decoder_input_ids=b.decoder_input_ids.to(dev),
            decoder_attention_mask=b.decoder_attention_mask.to(dev),
        )  # [B, U, V]
        rows, src, dst = b.rows.to(dev), b.src.to(dev), b.dst.to(dev)
        logits = out.new_zeros(idx.shape[0], idx.shape[1], out.shape[-1])
        logits[rows, dst] = out[rows, src]
        if targets is None:
            return logits
        loss = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), b.labels.to(dev).reshape(-1), ignore_index=-1)
        return logits, loss, self.aux_loss()

    # -- reduction -------------------------------------------------------------------------------------------------
    def reduced_skeleton(self, counts: list[int], expert_map: list[list[int]] | None = None) -> HFMoEModel:
        """A NEW model of the same class whose MoE blocks hold counts[i] experts (weights still to be written with
        `set_experts`); everything else (attention, embeddings, norms, shared experts, dense blocks) is copied."""
        if len(counts) != len(self._layers):
            raise ValueError(f"need one expert count per MoE layer ({len(self._layers)}), got {len(counts)}")
        for m in self._layers:
            if getattr(m.router, "bias", None) is not None:
                raise ValueError("reducing a router with a bias is not supported (no supported family has one)")
        k = fm.top_k(self.family, self.hf.config)
        stash = [(m.moe, m.router_module, m.experts) for m in self._layers]
        for m in self._layers:
            m.detach()
        try:
            for moe, _, _ in stash:  # leave the old experts out of the copy: only the reduced ones are ever built
                fm.set_path(moe, self.family.router_module, nn.Module())
                fm.set_path(moe, self.family.experts, nn.Module())
            new_hf = copy.deepcopy(self.hf)
        finally:
            for moe, router, experts in stash:
                fm.set_path(moe, self.family.router_module, router)
                fm.set_path(moe, self.family.experts, experts)
            for m in self._layers:
                m.attach()
        for m, (_, router, experts), d in zip(self._layers, stash, counts):
            moe = fm.get_path(new_hf, m.path)
            cfg = copy.deepcopy(new_hf.config)
            fm.set_expert_count(self.family, cfg, d, k)
            p_router, p_experts = next(router.parameters()), next(experts.parameters())
            new_router = type(router)(cfg).to(device=p_router.device, dtype=p_router.dtype)
            new_experts = type(experts)(cfg).to(device=p_experts.device, dtype=p_experts.dtype)
            fm.set_path(moe, self.family.router_module, new_router)
            fm.set_path(moe, self.family.experts, new_experts)
            if hasattr(moe, "top_k"):  # MixtralSparseMoeBlock keeps its own copy of k
                moe.top_k = min(k, d)
        sync_config(self.family, new_hf, counts, k)
        new = HFMoEModel(new_hf, expert_map=expert_map)
        new.checkpoint_meta = dict(self.checkpoint_meta)
        return new.train(self.training)


def sync_config(fam: fm.Family, hf_model: nn.Module, counts: list[int], k: int) -> None:
    """Make the transformers config describe the model's expert counts: D everywhere (top-k lowered to <= D), or,
    with different D per layer, `smoe_lab_experts_per_layer` (read back by smoe_lab.hf.load), the smallest D as the
    count (transformers' weight init loops over config-many experts of every block) and k unchanged (each block
    uses min(k, its D))."""
    cfg = hf_model.config
    uniform = len(set(counts)) == 1
    if uniform:
        fm.set_expert_count(fam, cfg, counts[0], k)
        if hasattr(cfg, "smoe_lab_experts_per_layer"):
            delattr(cfg, "smoe_lab_experts_per_layer")
    else:
        fm.set_expert_count(fam, cfg, min(counts), k, lower_top_k=False)
        cfg.smoe_lab_experts_per_layer = [int(c) for c in counts]
    for attr, value in (("num_experts", cfg_count(fam, cfg)), ("num_experts_per_tok", fm.top_k(fam, cfg))):
        if hasattr(hf_model, attr) and not isinstance(getattr(hf_model, attr), nn.Module):
            setattr(hf_model, attr, value)  # e.g. OlmoeForCausalLM.num_experts (its own aux-loss bookkeeping)


def cfg_count(fam: fm.Family, cfg) -> int:
    return int(getattr(cfg, fam.count_fields[0]))
