import torch

from smoe_lab.config import ModelConfig
from smoe_lab.model import GPT
from smoe_lab.moe import MoELayer


def test_moe_in_alternate_blocks_starting_with_first(tiny_cfg):
    cfg = tiny_cfg.replace(n_layer=5, num_experts=4)
    m = GPT(cfg, seed=0)
    assert [b.is_moe for b in m.transformer.h] == [True, False, True, False, True]
    assert len(m.moe_layers()) == 3 and all(isinstance(x, MoELayer) for x in m.moe_layers())
    r = m.moe_layers()[0].router
    assert isinstance(r, torch.nn.Linear) and r.bias is None and r.weight.shape == (4, 32)
    e = m.moe_layers()[0].experts
    assert e.w_in.shape == (4, 32, 64) and e.b_in.shape == (4, 64)
    assert e.w_out.shape == (4, 64, 32) and e.b_out.shape == (4, 32)


def test_forward_contract_and_aux(tiny_cfg):
    m = GPT(tiny_cfg.replace(num_experts=4), seed=0)
    idx = torch.randint(0, 97, (3, 16))
    logits = m(idx)
    assert logits.shape == (3, 16, 97)
    logits, loss, aux = m(idx, idx)
    manual = 0.01 * sum(layer.aux_loss for layer in m.moe_layers())
    assert torch.allclose(aux, manual) and aux > 0
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # near uniform at init
    dense = GPT(tiny_cfg, seed=0)
    assert dense(idx, idx)[2].item() == 0.0 and dense.moe_layers() == []


def test_gpt2_init_scales(tiny_cfg):
    m = GPT(tiny_cfg.replace(n_layer=8, num_experts=4), seed=1)
    std = lambda t: t.float().std().item()  # noqa: E731
    assert abs(std(m.transformer.wte.weight) - 0.02) < 2e-3
    assert abs(std(m.transformer.h[1].mlp.c_proj.weight) - 0.02 / 4) < 1e-3  # 1/sqrt(2*8)
    assert abs(std(m.moe_layers()[0].experts.w_out) - 0.02 / 4) < 1e-3
    assert abs(std(m.moe_layers()[0].router.weight) - 0.02) < 5e-3
    assert torch.equal(m.lm_head.weight, m.transformer.wte.weight)


def test_same_seed_same_model(tiny_cfg):
    a, b = GPT(tiny_cfg.replace(num_experts=4), seed=3), GPT(tiny_cfg.replace(num_experts=4), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_padding_does_not_change_real_tokens_or_stats(tiny_cfg):
    m = GPT(tiny_cfg.replace(num_experts=4, drop_tokens=False), seed=0).eval()
    idx = torch.randint(0, 97, (1, 10))
    padded = torch.cat([idx, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = torch.tensor([[True] * 10 + [False] * 6])
    a = m(idx)
    counts_a = [t.routed_counts.clone() for t in m.telemetry()]
    b = m(padded, mask=mask)[:, :10]
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.equal(x, t.routed_counts) for x, t in zip(counts_a, m.telemetry()))


def test_active_params_counts_one_expert_per_layer():
    dense = GPT(ModelConfig.preset("tiny"))
    moe = GPT(ModelConfig.preset("tiny", num_experts=8))
    router = 8 * 128 * 2
    assert moe.num_active_params() == dense.num_params() + router
    assert moe.num_params() > 2 * dense.num_params()


def test_per_layer_counts_build_different_sizes():
    m = GPT(ModelConfig.preset("tiny", num_experts=[8, 3]))
    assert [x.num_experts for x in m.moe_layers()] == [8, 3]
