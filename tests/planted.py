"""A model with planted expert structure, shared by the reduction, cluster and widget tests."""

import torch

from smoe_lab.config import ModelConfig
from smoe_lab.model import GPT
from smoe_lab.reduce import ExpertWeights, permute_expert

Z, D, DM, FF = 12, 3, 32, 24


def planted_model(seed=0, noise=1e-3):
    """Every MoE layer: Z experts = D groups of permuted, slightly perturbed copies of a base expert, with router
    rows nearly equal within a group. Returns (model, groups [Z], bases per layer)."""
    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig.preset(
        "tiny", n_layer=4, n_head=2, d_model=DM, d_ff=FF, vocab_size=97, block_size=16, num_experts=Z
    )
    model = GPT(cfg, seed=seed)
    groups = torch.arange(Z) % D  # interleaved so that groups are not contiguous
    bases = []
    for layer in model.moe_layers():
        base = [
            ExpertWeights(
                torch.randn(DM, FF, generator=g) * 0.3,
                torch.randn(FF, generator=g) * 0.1,
                torch.randn(FF, DM, generator=g) * 0.3,
                torch.randn(DM, generator=g) * 0.1,
            )
            for _ in range(D)
        ]
        rows = torch.randn(D, DM, generator=g)
        with torch.no_grad():
            for z in range(Z):
                e = permute_expert(base[groups[z]], torch.randperm(FF, generator=g))
                for name, t in zip(("w_in", "b_in", "w_out", "b_out"), e):
                    getattr(layer.experts, name)[z] = t + noise * torch.randn(t.shape, generator=g)
                layer.router.weight[z] = rows[groups[z]] + noise * torch.randn(DM, generator=g)
        bases.append(base)
    return model, groups.numpy(), bases


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (4, 16), generator=g) for _ in range(n)]
