"""One expert's parameters as a record, in each layout the reducers read and write: the native stacked layout
(`ExpertWeights`), the SwiGLU experts of transformers' fused decoders (`GatedExpertWeights`) and T5's bias-free
experts (`BiasFreeExpertWeights`). smoe_lab.reduce.align (alignment, permutation) and smoe_lab.hf.experts (reading
and writing HF experts) both use them; they are re-exported from smoe_lab.reduce.align and smoe_lab.reduce."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertWeights(NamedTuple):
    """One expert's parameters in the model's layout (expert e of the stacked `MoELayer.experts`)."""

    w_in: torch.Tensor  # [d_model, d_ff]
    b_in: torch.Tensor  # [d_ff]
    w_out: torch.Tensor  # [d_ff, d_model]
    b_out: torch.Tensor  # [d_model]


class GatedExpertWeights(NamedTuple):
    """A SwiGLU expert in the nn.Linear layout of transformers' fused experts (OLMoE, Qwen-MoE, Mixtral):
    down(act(x W_gate^T) * (x W_up^T)); W_gate / W_up are rows [0, f) / [f, 2f) of `gate_up_proj[e]` [2f, d_model]
    and W_down is `down_proj[e]` [d_model, f]."""

    w_gate: torch.Tensor  # [d_ff, d_model]
    w_up: torch.Tensor  # [d_ff, d_model]
    w_down: torch.Tensor  # [d_model, d_ff]


class BiasFreeExpertWeights(NamedTuple):
    """A T5 / Switch Transformers expert (`wi`, `wo`, no biases) in the nn.Linear layout: wo(act(wi x))."""

    wi: torch.Tensor  # [d_ff, d_model]
    wo: torch.Tensor  # [d_model, d_ff]
