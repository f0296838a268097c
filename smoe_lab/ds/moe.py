"""A top-1 MoE FFN built from DeepSpeed-MoE (`deepspeed.moe.layer.MoE`), with the native layer's interface.

`DeepSpeedMoELayer` IS a `deepspeed.moe.layer.MoE` (so the DeepSpeed engine finds it, builds its expert-parallel
groups and writes its per-expert checkpoint files), called like `smoe_lab.moe.MoELayer`:

    forward(x [B, T, C], mask [B, T] | None) -> [B, T, C]; `.aux_loss` (alpha not applied) and `.telemetry`
    (a `smoe_lab.moe.MoETelemetry`) hold the last call's load-balancing loss and routing statistics.

Each expert is `nn.Sequential(Linear(C, d_ff), GELU(tanh), Linear(d_ff, C))`, the native expert e with
`0.weight = w_in[e].T`, `0.bias = b_in[e]`, `2.weight = w_out[e].T`, `2.bias = b_out[e]`; the router is the gate's
`wg` (nn.Linear(C, E, bias=False)), the native `router`. smoe_lab.ds.convert maps the two layouts.

Telemetry comes from one forward hook on the gate (`deepspeed_moe.gate`): the gate's input gives the router logits
(recomputed exactly as the gate does, `F.linear(x.float(), wg.weight.float())`: TopKGate calls F.linear, never
`wg(...)`, so a hook on `wg` would not fire), its outputs the capacity, the routed counts before drops (exp_counts)
and the expert of every kept token (dropped tokens have index -1), hence the processed counts.

Differences from the native layer (all DeepSpeed's own choices, kept as they are):
- which tokens a full expert keeps: torch.topk over the expert's 0/1 column (tie order), or random tokens with
  `use_rts` (DeepSpeed's default, Random Token Selection); the native layer keeps the first in token order.
  Routed and processed counts agree; token identity may differ once capacity binds.
- with a padding mask, DeepSpeed counts padding in the capacity (tokens = all N) and in the mean router
  probability of the aux loss; the native layer uses real tokens only. Padding is never routed in either.
- `.experts` is a read-only view: stacked COPIES of the local experts' weights in the native layout
  (w_in [E_local, C, d_ff] ...). Writing into it changes nothing; convert to the native layout to edit experts.
- with ep_size > 1 a rank holds E / ep_size experts (global ids ep_rank * E_local + j); `.num_experts` is the
  global E, `.num_local_experts` the local count, and parameter counts of the model are per rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import Tensor

from ..moe import MoETelemetry

SKIP_GPT_INIT = "_smoe_init_by_moe_layer"  # marker on Linear modules that GPT.init_weights must leave alone


def expert_parallel_rank(ep_size: int) -> int:
    """This process's rank inside its expert-parallel group: DeepSpeed's groups are consecutive ranks."""
    if ep_size == 1:
        return 0
    if not torch.distributed.is_initialized():
        raise ValueError(
            f"ModelConfig.ep_size={ep_size} needs torch.distributed initialised before the model is built "
            "(launch with `deepspeed`, engine: deepspeed)"
        )
    world = torch.distributed.get_world_size()
    if world % ep_size:
        raise ValueError(f"ModelConfig.ep_size={ep_size} must divide the world size {world}")
    return torch.distributed.get_rank() % ep_size


class ExpertsView:
    """Read-only native-layout view of a DeepSpeed layer's local experts (stacked copies, see the module doc)."""

    def __init__(self, experts: nn.ModuleList):
        self._experts = experts

    @property
    def num_experts(self) -> int:
        return len(self._experts)

    def _stack(self, linear: int, attr: str, transpose: bool) -> Tensor:
        ts = [getattr(e[linear], attr).detach() for e in self._experts]
        return torch.stack([t.T if transpose else t for t in ts])

    @property
    def w_in(self) -> Tensor:  # [E_local, C, d_ff]
        return self._stack(0, "weight", True)

    @property
    def b_in(self) -> Tensor:  # [E_local, d_ff]
        return self._stack(0, "bias", False)

    @property
    def w_out(self) -> Tensor:  # [E_local, d_ff, C]
        return self._stack(2, "weight", True)

    @property
    def b_out(self) -> Tensor:  # [E_local, C]
        return self._stack(2, "bias", False)

    def parameters(self):
        """The four stacked copies (for counting, as `GPT.num_active_params` does)."""
        return iter((self.w_in, self.b_in, self.w_out, self.b_out))

    def forward_one(self, e: int, x: Tensor) -> Tensor:
        """Local expert e on x [n, C] (reference path)."""
        return self._experts[e](x)


class DeepSpeedMoELayer(MoE):
    """Top-1 DeepSpeed-MoE FFN with the native MoELayer's call signature, `.router`, `.aux_loss`, `.telemetry`."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        capacity_factor_train: float = 1.2,
        capacity_factor_eval: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        ep_size: int = 1,
        use_rts: bool = False,
    ):
        expert = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(approximate="tanh"), nn.Linear(d_ff, d_model))
        for m in (expert[0], expert[2]):
            setattr(m, SKIP_GPT_INIT, True)  # initialised by init_weights_ from the stacked draws
        super().__init__(
            d_model,
            expert,
            num_experts=num_experts,
            ep_size=ep_size,
            k=1,
            capacity_factor=capacity_factor_train,
            eval_capacity_factor=capacity_factor_eval,
            min_capacity=min_capacity,
            drop_tokens=drop_tokens,
            use_rts=use_rts,
        )
        self.ep_rank = expert_parallel_rank(ep_size)
        self.d_model, self.d_ff = d_model, d_ff
        self.aux_loss: Tensor | None = None
        self.telemetry: MoETelemetry | None = None
        self.record_logits = True
        self._telemetry_hook = self.deepspeed_moe.gate.register_forward_hook(self._record_gate)

    # -- the native layer's names ----------------------------------------------------------------------------
    @property
    def router(self) -> nn.Linear:
        """The gate's linear, nn.Linear(d_model, E, bias=False): weight [E, d_model] (global E)."""
        return self.deepspeed_moe.gate.wg

    @property
    def experts(self) -> ExpertsView:
        return ExpertsView(self.deepspeed_moe.experts.deepspeed_experts)

    @property
    def local_experts(self) -> nn.ModuleList:
        """The local expert modules (Sequential(Linear, GELU, Linear)), trainable."""
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def global_expert_ids(self) -> list[int]:
        return [self.ep_rank * self.num_local_experts + j for j in range(self.num_local_experts)]

    @property
    def capacity_factor_train(self) -> float:
        return self.deepspeed_moe.gate.capacity_factor

    @property
    def capacity_factor_eval(self) -> float:
        return self.deepspeed_moe.gate.eval_capacity_factor

    @property
    def capacity_factor(self) -> float:
        return self.capacity_factor_train if self.training else self.capacity_factor_eval

    @property
    def min_capacity(self) -> int:
        return self.deepspeed_moe.gate.min_capacity

    @property
    def drop_tokens(self) -> bool:
        return self.deepspeed_moe.gate.drop_tokens

    @property
    def use_rts(self) -> bool:
        return self.deepspeed_moe.gate.use_rts

    # -- init and forward ------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights_(self, n_layer: int, generator: torch.Generator | None = None, router_std: float = 0.02) -> None:
        """`smoe_lab.moe.init_moe_` on the full stacked layout (same draws, same order), then this rank's slice.

        So GPT(config, seed) holds the same weights with moe_impl native or deepspeed, at any ep_size.
        """
        e, c, f, std = self.num_experts, self.d_model, self.d_ff, 0.02
        router = torch.empty(e, c).normal_(0.0, router_std, generator=generator)
        w_in = torch.empty(e, c, f).normal_(0.0, std, generator=generator)
        w_out = torch.empty(e, f, c).normal_(0.0, std / math.sqrt(2 * n_layer), generator=generator)
        self.router.weight.copy_(router)
        for j, g in enumerate(self.global_expert_ids):
            lin_in, lin_out = self.local_experts[j][0], self.local_experts[j][2]
            lin_in.weight.copy_(w_in[g].T)
            lin_out.weight.copy_(w_out[g].T)
            lin_in.bias.zero_()
            lin_out.bias.zero_()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        used = None if mask is None else mask.reshape(-1).to(torch.int64)  # [N]; padding: 0
        out, l_aux, _ = super().forward(x, used)
        self.aux_loss = l_aux
        return out

    def disable_telemetry(self) -> None:
        """Remove the gate hook (no `.telemetry` from now on): inference profiling times DeepSpeed's layer alone."""
        if self._telemetry_hook is not None:
            self._telemetry_hook.remove()
            self._telemetry_hook = None
        self.telemetry = None

    def _record_gate(self, gate: nn.Module, args: tuple, output: tuple) -> None:
        """Forward hook on the gate: args (x [N, C], used_token, ...), output (l_aux, C, E, idx [1, N], ...)."""
        x, used = args[0], args[1] if len(args) > 1 else None
        with torch.no_grad():
            logits = F.linear(x.detach().float(), gate.wg.weight.detach().float())  # [N, E], as the gate
        idx = output[3].reshape(-1).long()  # [N]: expert of each kept token, -1 dropped or padding
        processed = torch.bincount(idx[idx >= 0], minlength=self.num_experts)
        probs = F.softmax(logits, dim=1)
        self.telemetry = MoETelemetry.of_call(
            logits, probs, output[6].long(), processed, output[1], used, self.record_logits
        )


def build_layer(cfg, num_experts: int) -> DeepSpeedMoELayer:
    """The DeepSpeed-MoE layer of a ModelConfig (moe_impl deepspeed) with `num_experts` experts."""
    return DeepSpeedMoELayer(
        cfg.d_model,
        cfg.d_ff,
        num_experts,
        cfg.capacity_factor_train,
        cfg.capacity_factor_eval,
        cfg.min_capacity,
        cfg.drop_tokens,
        ep_size=cfg.ep_size,
        use_rts=cfg.use_rts,
    )


__all__ = ["DeepSpeedMoELayer", "ExpertsView", "SKIP_GPT_INIT", "build_layer", "expert_parallel_rank"]
