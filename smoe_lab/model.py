"""GPT-2 decoder (pre-LN, GELU, learned positions, tied embeddings) with top-1 MoE FFNs in alternate blocks.

Names follow GPT-2 / nanoGPT: wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2, mlp (c_fc, c_proj) or moe
(router, experts), ln_f, lm_head.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig
from .moe import MoELayer, gelu, init_moe_


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape  # (B, T, C)
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The dense GPT-2 FFN: c_proj(gelu(c_fc(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.dropout(self.c_proj(gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, num_experts: int | None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        if num_experts is None:
            self.mlp = MLP(cfg)
        elif cfg.moe_impl == "deepspeed":
            from .ds.moe import build_layer  # needs deepspeed installed

            self.mlp = build_layer(cfg, num_experts)
        else:
            self.mlp = MoELayer(
                cfg.d_model,
                cfg.d_ff,
                num_experts,
                cfg.capacity_factor_train,
                cfg.capacity_factor_eval,
                cfg.min_capacity,
                cfg.drop_tokens,
                router_jitter=cfg.router_jitter,
                router_z_loss_coef=cfg.router_z_loss_coef,
            )
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def is_moe(self) -> bool:
        return not isinstance(self.mlp, MLP)  # MoELayer or DeepSpeedMoELayer

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.drop(self.mlp(self.ln_2(x), mask))


class GPT(nn.Module):
    """gpt(idx) -> logits; gpt(idx, targets) -> (logits, loss, aux).

    loss is the LM cross-entropy (targets == -1 ignored); aux is the sum over MoE layers of the load-balancing
    loss times aux_loss_coef. Training minimises loss + aux. `mask` [B, T] (True = real token) keeps padding
    out of routing statistics and the aux loss; with right padding and causal attention real tokens never
    see padding.
    """

    def __init__(self, config: ModelConfig, seed: int | None = None):
        super().__init__()
        self.config = config
        per_layer = iter(config.experts_per_layer)
        moe_blocks = set(config.moe_block_indices) if config.is_moe else set()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                wpe=nn.Embedding(config.block_size, config.d_model),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(
                    [Block(config, next(per_layer) if i in moe_blocks else None) for i in range(config.n_layer)]
                ),
                ln_f=nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.init_weights(seed)

    # -- init ----------------------------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 init: normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer), biases zero."""
        g = None if seed is None else torch.Generator().manual_seed(seed)
        n_layer = self.config.n_layer
        with torch.no_grad():
            for name, m in self.named_modules():
                if getattr(m, "_smoe_init_by_moe_layer", False):
                    continue  # a DeepSpeed expert's Linear: its MoE layer draws it below
                if isinstance(m, nn.Linear):
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj") else 0.02
                    m.weight.normal_(0.0, std, generator=g)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.Embedding):
                    m.weight.normal_(0.0, 0.02, generator=g)
                elif isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    if m.bias is not None:
                        m.bias.zero_()
            for layer in self.moe_layers():
                if isinstance(layer, MoELayer):
                    init_moe_(layer, n_layer, g, router_std=self.config.router_init_std)
                else:  # DeepSpeed-MoE: init_moe_'s draws on the stacked layout
                    layer.init_weights_(n_layer, g, router_std=self.config.router_init_std)

    # -- structure -----------------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoELayer]:
        """MoE layers in depth order."""
        return [b.mlp for b in self.transformer.h if b.is_moe]

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def num_active_params(self) -> int:
        """Parameters touched per token: every MoE layer counts one expert (top-1) plus its router."""
        n = self.num_params()
        for layer in self.moe_layers():
            per_expert = sum(p[0].numel() for p in layer.experts.parameters())
            n -= per_expert * (layer.num_experts - 1)
        return n

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, idx: Tensor, targets: Tensor | None = None, mask: Tensor | None = None):
        b, t = idx.shape  # (B, T)
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, mask)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, self.aux_loss()

    def aux_loss(self) -> Tensor:
        """alpha * sum of the last forward's per-layer load-balancing losses (0 for a dense model), plus
        router_z_loss_coef * sum of the per-layer router z-losses when that option is on."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros((), device=self.lm_head.weight.device)
        aux = self.config.aux_loss_coef * torch.stack([m.aux_loss for m in layers]).sum()
        if self.config.router_z_loss_coef > 0:
            aux = aux + self.config.router_z_loss_coef * torch.stack([m.z_loss for m in layers]).sum()
        return aux

    def telemetry(self):
        """Per MoE layer routing statistics of the last forward pass."""
        return [m.telemetry for m in self.moe_layers()]

    def set_record_logits(self, on: bool) -> None:
        for m in self.moe_layers():
            m.record_logits = on
