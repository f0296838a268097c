"""The Switch MoE layer (`MoELayer`): top-1 routing (smoe_lab.moe_routing) and stacked experts with their expert
paths (smoe_lab.moe_experts), both re-exported here.

Routing is a pure function of the router logits (`top1_route`) with DeepSpeed-MoE's capacity rule and
load-balancing loss. Experts are stacked tensors (w_in [E, d_model, d_ff] ...) so that merging and
compaction are tensor operations. Dispatch and combine are row gathers in both directions; no
[tokens, experts, capacity] one-hot tensor exists, so activation memory grows with tokens only.

Expert paths (`resolve_path`; switch: MoELayer.expert_path, $SMOE_LAB_MOE_PATH, CUDA_DEFAULT_PATH):
"grouped" (CPU default: exact per-expert slices, pooled gradients and activations), "padded" (a static
[E, capacity, d] buffer, two baddbmm; CUDA default) and "grouped_mm" (torch._grouped_mm).

Host syncs: the training forward + backward of the "padded" and "grouped_mm" paths reads no device value on
the host (counts are scatter-adds, never bincount or boolean indexing; the capacity is host arithmetic on the
token count; the padded buffer has the static capacity, not the largest kept count). What remains, by design:
with a padding mask, one read of the number of real tokens (DeepSpeed's capacity rule needs it);
drop_tokens=False reads the largest count (its capacity, as DeepSpeed); the "grouped" path reads the per-expert
counts (free on CPU). Telemetry stores tensors; its floats (dropped fraction, entropy) sync only when read.
Checked by tests/test_moe.py (aten ops recorded on CPU) and benchmarks/check_sync.py (CUDA sync debug mode).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .moe_experts import (  # noqa: F401  (re-exported: smoe_lab.moe is where these are imported from)
    CUDA_DEFAULT_PATH,
    EXPERT_PATHS,
    BufferPool,
    DispatchPlan,
    Experts,
    GroupPlan,
    combine,
    dispatch,
    dispatch_combine,
    gelu,
    moe_reference,
    plan_dispatch,
    plan_groups,
    resolve_path,
)
from .moe_routing import (  # noqa: F401
    MoETelemetry,
    Routing,
    count_per_expert,
    expert_capacity,
    queue_position,
    router_z_loss,
    top1_route,
    top1_route_reference,
)


class MoELayer(nn.Module):
    """Top-1 Switch MoE FFN. `.router` is nn.Linear(d_model, E, bias=False); `.experts` holds the stacked FFNs.

    forward(x [B, T, C], mask [B, T] | None) -> [B, T, C]. A kept token's output is gate * expert(x); a dropped
    token's output is zero (the residual stream carries it). The load-balancing loss of the last call is in
    `.aux_loss` (alpha not applied) and routing statistics in `.telemetry`.

    Router options that help routers learn (off by default, see docs/routers.md): router_jitter multiplies the
    router's input (not the experts') by uniform(1 - eps, 1 + eps) noise in training (Switch, Fedus et al. 2021);
    router_z_loss_coef > 0 makes the layer keep `.z_loss`, the mean over real tokens of logsumexp(logits)^2
    (ST-MoE, Zoph et al. 2022; the coefficient is applied by GPT.aux_loss).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        capacity_factor_train: float = 1.2,
        capacity_factor_eval: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        router_jitter: float = 0.0,
        router_z_loss_coef: float = 0.0,
    ):
        super().__init__()
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.router_jitter = router_jitter
        self.router_z_loss_coef = router_z_loss_coef
        self.z_loss: Tensor | None = None
        self.experts = Experts(num_experts, d_model, d_ff)
        self.capacity_factor_train = capacity_factor_train
        self.capacity_factor_eval = capacity_factor_eval
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.aux_loss: Tensor | None = None
        self.telemetry: MoETelemetry | None = None
        self.record_logits = True
        self.expert_path: str | None = None  # None: $SMOE_LAB_MOE_PATH or the device default (see resolve_path)

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def capacity_factor(self) -> float:
        return self.capacity_factor_train if self.training else self.capacity_factor_eval

    def route(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Routing]:
        """x [N, C] -> (logits [N, E], Routing). Keeps `.z_loss` when router_z_loss_coef > 0."""
        if self.training and self.router_jitter > 0:  # Switch's input jitter: the router's input only
            eps = self.router_jitter
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        logits = self.router(x)  # [N, E]
        if self.router_z_loss_coef > 0:
            self.z_loss = router_z_loss(logits, mask)
        return logits, top1_route(logits, self.capacity_factor, self.min_capacity, self.drop_tokens, mask)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # [N, C]
        flat_mask = None if mask is None else mask.reshape(-1)
        logits, r = self.route(xf, flat_mask)
        y = dispatch_combine(self.experts, xf, r, path=self.expert_path)  # [N, C]
        self._record(logits, r, flat_mask)
        return y.reshape(shape)

    def _record(self, logits: Tensor, r: Routing, mask: Tensor | None) -> None:
        self.aux_loss = r.aux_loss
        self.telemetry = MoETelemetry.of_call(
            logits, r.gates, r.routed_counts, r.processed_counts, r.capacity, mask, self.record_logits, r.num_real
        )


def init_moe_(
    layer: MoELayer, n_layer: int, generator: torch.Generator | None = None, router_std: float = 0.02
) -> None:
    """GPT-2 init: normal(0, 0.02); the residual projection (w_out) scaled by 1/sqrt(2 n_layer); biases zero.

    router_std: the router's std (ModelConfig.router_init_std, 0.02 by default); the draws are the same either way.
    """
    std = 0.02
    with torch.no_grad():
        layer.router.weight.normal_(0.0, router_std, generator=generator)
        layer.experts.w_in.normal_(0.0, std, generator=generator)
        layer.experts.w_out.normal_(0.0, std / math.sqrt(2 * n_layer), generator=generator)
        layer.experts.b_in.zero_()
        layer.experts.b_out.zero_()


def reinit_router_(layer: MoELayer, seed: int) -> None:
    """Re-initialise a router with the same rule as at pretraining (normal 0.02), from a seed."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        w = torch.empty(layer.router.weight.shape).normal_(0.0, 0.02, generator=g)
        layer.router.weight.copy_(w)
