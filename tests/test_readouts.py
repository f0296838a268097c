import numpy as np
import pytest
import torch
from planted import D, planted_model

from smoe_lab.data.corpus import open_corpus, prepare
from smoe_lab.model import GPT
from smoe_lab.readouts import domain_calibration_batches, domain_lm_loss, layer_reconstruction
from smoe_lab.reduce import reduce_model


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (4, 16), generator=g) for _ in range(n)]


def test_reconstruction_is_zero_for_recovered_groups_and_large_for_random_pruning():
    model, _, _ = planted_model(noise=1e-5)  # D groups of near-copies of D experts
    merged, _ = reduce_model(model, "uncurl", D, _batches(), router="merge")
    for layer in layer_reconstruction(model, merged, _batches(seed=1)):
        # the experts are kept exactly; the merged router's softmax runs over D instead of Z experts, so a group of
        # Z/D = 4 near-equal logits hands its whole probability to one expert: the gate, hence the output, is 4x
        assert layer["mapped"] < 1e-6 and layer["routed"] == pytest.approx((4 - 1) ** 2, rel=1e-2), layer
    pruned, _ = reduce_model(model, "random", 1, _batches(), router="keep")
    errs = layer_reconstruction(model, pruned, _batches(seed=1))
    # one expert of D kept: ~(D-1)/D of the tokens lose their output (mapped), the rest is routed to it
    assert all(0.3 < e["mapped"] < 1.0 for e in errs), errs
    assert all(e["routed"] > 0.05 for e in errs), errs


def test_reconstruction_of_an_identity_reduction_and_with_padding(tiny_cfg):
    model = GPT(tiny_cfg.replace(num_experts=4), seed=0)
    same, _ = reduce_model(model, "freq_prune", 4, _batches(), router="keep")
    idx = _batches(1)[0]
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[:, 10:] = False
    for e in layer_reconstruction(model, same, [(idx, mask)]):
        assert e["routed"] == pytest.approx(0.0, abs=1e-12) and e["mapped"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="labels of MoE layer 0"):
        layer_reconstruction(model, same, [idx], labels=[np.zeros(3, dtype=np.int64)])
    with pytest.raises(ValueError, match="no expert_map"):
        layer_reconstruction(model, model, [idx])


@pytest.fixture(scope="module")
def corpus():
    return open_corpus(prepare("tiny"))


def test_domain_calibration_batches_are_the_heldout_documents(corpus):
    batches = domain_calibration_batches(corpus, "news", batch_size=4, block_size=32, max_tokens=300)
    flat = torch.cat(batches).reshape(-1)
    assert sum(b.shape[0] for b in batches) == 300 // 32 and all(b.shape[1] == 32 for b in batches)
    first = corpus.tokenizer.encode_batch(corpus.heldout("news")[:1])[0]
    assert flat[: min(len(first), flat.numel())].tolist() == list(first)[: flat.numel()]
    with pytest.raises(ValueError, match="unknown domain"):
        domain_calibration_batches(corpus, "cooking", 4, 32)


def test_domain_lm_loss_is_the_token_weighted_window_loss(corpus, tiny_cfg):
    cfg = tiny_cfg.replace(vocab_size=corpus.tokenizer.vocab_size, block_size=32, num_experts=4)
    cfg = cfg.replace(capacity_factor_eval=8.0)  # no drops: the loss does not depend on how windows are batched
    model = GPT(cfg, seed=0)
    tokens = corpus.split("val_news")
    got = domain_lm_loss(model, tokens, batch_size=3, max_windows=5)
    starts = np.arange(5) * ((len(tokens) - 1) // 32) // 5 * 32  # 5 windows spread evenly over the stream
    buf = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(33)], dtype=np.int64))
    model.eval()
    with torch.no_grad():
        _, want, _ = model(buf[:, :-1], buf[:, 1:])
    assert got["tokens"] == 5 * 32 and got["loss"] == pytest.approx(float(want), rel=1e-5)
    assert got["drop_frac"] == 0.0
