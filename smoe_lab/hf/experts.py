"""The experts of a Hugging Face MoE block as the aligner and merger take them, and back.

    fused_swiglu  experts.gate_up_proj [E, 2f, d_model] (gate rows [0, f), up rows [f, 2f)), experts.down_proj
                  [E, d_model, f]  <->  GatedExpertWeights(w_gate [f, d], w_up [f, d], w_down [d, f]) per expert
    t5            experts["expert_{e}"].wi.weight [f, d], .wo.weight [d, f] (no biases)
                  <->  BiasFreeExpertWeights(wi, wo) per expert

`read_experts` returns views (no copy) for the fused layout; `write_experts` copies into an existing container
with as many experts as given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..expert_weights import BiasFreeExpertWeights, GatedExpertWeights
from .families import Family


def _check_fused(experts: nn.Module) -> None:
    """The fused layout smoe_lab reads: concatenated [gate; up], not transposed, no biases."""
    flags = {"is_concatenated": True, "is_transposed": False, "has_bias": False}
    for flag, want in flags.items():
        if getattr(experts, flag, want) != want:
            raise ValueError(f"{type(experts).__name__}.{flag} is {getattr(experts, flag)}: smoe_lab reads {flags}")


def num_experts(fam: Family, experts: nn.Module) -> int:
    return experts.gate_up_proj.shape[0] if fam.layout == "fused_swiglu" else len(experts)


def read_experts(fam: Family, experts: nn.Module) -> list[GatedExpertWeights | BiasFreeExpertWeights]:
    """One NamedTuple per expert, detached."""
    if fam.layout == "fused_swiglu":
        _check_fused(experts)
        gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()  # [E, 2f, d], [E, d, f]
        f = gu.shape[1] // 2
        return [GatedExpertWeights(gu[e, :f], gu[e, f:], down[e]) for e in range(gu.shape[0])]
    out = []
    for e in range(len(experts)):
        mlp = experts[f"expert_{e}"]
        if getattr(mlp.wi, "bias", None) is not None or getattr(mlp.wo, "bias", None) is not None:
            raise ValueError("T5 experts with biases are not supported (Switch Transformers' have none)")
        out.append(BiasFreeExpertWeights(mlp.wi.weight.detach(), mlp.wo.weight.detach()))
    return out


@torch.no_grad()
def write_experts(fam: Family, experts: nn.Module, weights: Sequence[GatedExpertWeights | BiasFreeExpertWeights]):
    """Copy `weights` (one per expert) into the container, which must hold len(weights) experts of that shape."""
    if num_experts(fam, experts) != len(weights):
        raise ValueError(f"expert container holds {num_experts(fam, experts)} experts, got {len(weights)}")
    if fam.layout == "fused_swiglu":
        _check_fused(experts)
        experts.gate_up_proj.copy_(torch.stack([torch.cat([w.w_gate, w.w_up]) for w in weights]))
        experts.down_proj.copy_(torch.stack([w.w_down for w in weights]))
        return
    for e, w in enumerate(weights):
        experts[f"expert_{e}"].wi.weight.copy_(w.wi)
        experts[f"expert_{e}"].wo.weight.copy_(w.wo)
