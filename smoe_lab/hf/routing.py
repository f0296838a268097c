"""Routing of the Hugging Face families as pure functions of router logits, and the telemetry smoe_lab keeps.

The logits come from a forward hook on each MoE block's routing linear map (smoe_lab.hf.model), never from
`output_router_logits` (several transformers 5.x releases record probabilities or the top-1 value there). From the
logits this module recomputes what the model does with them, exactly as transformers 5.x does:

    top-k (OLMoE, Qwen-MoE, Mixtral)  p = softmax(logits) in float32; the k largest p; renormalised to sum to 1 when
                                      norm_topk_prob (always for Mixtral). No token is dropped.
    top-1 Switch                      argmax of softmax(logits); a token is dropped when its expert already took
                                      `expert_capacity` tokens of the same sequence (cumulative count along the
                                      sequence, padding last, as SwitchTransformersTop1Router); weight = max p.

Statistics are over real tokens only (a mask drops padding and tokens the adapter adds, such as BOS / EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..moe import MoETelemetry


@dataclass
class TopKRouting:
    """Routing of N tokens over E experts with k choices each."""

    probs: Tensor  # [N, E] float32 softmax of the logits
    index: Tensor  # [N, k] long: the chosen experts (largest probability first)
    weight: Tensor  # [N, k] float32: the weight each choice gets in the output
    kept: Tensor  # [N, k] bool: processed by its expert (False: dropped by capacity)


def route_topk(logits: Tensor, k: int, normalize: bool) -> TopKRouting:
    """logits [N, E] -> TopKRouting (no capacity: every choice is processed)."""
    probs = F.softmax(logits.float(), dim=-1)  # [N, E]
    weight, index = torch.topk(probs, k, dim=-1)  # [N, k]
    if normalize:
        weight = weight / weight.sum(-1, keepdim=True)
    return TopKRouting(probs, index, weight, torch.ones_like(index, dtype=torch.bool))


def route_switch(logits: Tensor, capacity: int) -> TopKRouting:
    """logits [B, T, E] (one row per sequence) -> top-1 TopKRouting over the B*T tokens, with HF Switch's
    per-sequence capacity: a token is kept when it is among the first `capacity` tokens of its sequence routed to
    its expert (padding sorts last in right-padded batches, so it never takes a real token's place)."""
    if logits.dim() != 3:
        raise ValueError(f"Switch router logits must be [B, T, E], got shape {tuple(logits.shape)}")
    b, t, e = logits.shape
    probs = F.softmax(logits.float(), dim=-1)  # [B, T, E]
    weight, index = probs.max(-1)  # [B, T]
    priority = torch.cumsum(F.one_hot(index, e), dim=1).gather(-1, index.unsqueeze(-1)).squeeze(-1)  # [B, T]
    kept = priority <= capacity
    return TopKRouting(probs.reshape(b * t, e), index.reshape(-1, 1), weight.reshape(-1, 1), kept.reshape(-1, 1))


def balance_loss(r: TopKRouting) -> Tensor:
    """E * sum_i f_i P_i over the tokens of `r` (f_i: selections of expert i per token, summing to k; P_i: mean
    probability). Top-1 is DeepSpeed's / Switch's loss; top-k is transformers' `load_balancing_loss_func`."""
    n, e = r.probs.shape
    if n == 0:
        return r.probs.sum() * 0.0
    f = torch.bincount(r.index.reshape(-1), minlength=e).to(r.probs.dtype) / n  # [E]
    return e * torch.sum(f * r.probs.mean(0))


def z_loss(logits: Tensor) -> Tensor:
    """mean over tokens of logsumexp(logits)^2 (router z-loss, ST-MoE / Switch)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


@dataclass
class TopKTelemetry(MoETelemetry):
    """MoETelemetry of a top-k layer: routed_counts are argmax (top-1) counts, processed_counts count processed
    choices (k per token when nothing is dropped); selected_counts count choices before drops, gate_mass sums the
    routing weights each expert got."""

    selected_counts: Tensor  # [E] long
    gate_mass: Tensor  # [E] float64
    top_k: int

    @property
    def dropped_fraction(self) -> float:
        return 1.0 - float(self.processed_counts.sum()) / max(self.top_k * self.num_tokens, 1)


def telemetry(logits: Tensor, r: TopKRouting, valid: Tensor | None, capacity: int, record_logits: bool):
    """TopKTelemetry of one forward over the valid rows (detached); logits [N, E] as the rows of `r`."""
    e = r.probs.shape[1]
    sel = slice(None) if valid is None else valid
    probs, index, weight, kept = (x.detach()[sel] for x in (r.probs, r.index, r.weight, r.kept))
    flat = index.reshape(-1)
    return TopKTelemetry(
        router_logits=logits.detach()[sel].float() if record_logits else logits.new_empty(0, e, dtype=torch.float32),
        router_probs=probs,
        routed_counts=torch.bincount(probs.argmax(-1), minlength=e),
        processed_counts=torch.bincount(flat[kept.reshape(-1)], minlength=e),
        capacity=capacity,
        selected_counts=torch.bincount(flat, minlength=e),
        gate_mass=torch.zeros(e, dtype=torch.float64, device=flat.device).index_add_(
            0, flat, weight.reshape(-1).double()
        ),
        top_k=index.shape[1],
    )
