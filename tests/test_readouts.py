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


# -- the replication study's stages: router health of every model, the readouts per seed -------------------------
def test_replication_router_health_and_readout_stages(tmp_path):
    import json

    from smoe_lab import checkpoint, paths
    from smoe_lab import replication as R
    from smoe_lab.notebook_params import ReplicationNotebook
    from smoe_lab.router_health import router_health

    p = ReplicationNotebook.from_yaml(
        paths.params_dir() / "05_replication" / "ci.yaml",
        out_dir=str(tmp_path),
        seeds=[0],
        methods=["uncurl", "freq_prune"],
        zero_shot_tasks=[],
        ablation_tokens=[],
    )
    R.pretrain_all(p)
    R.pretraining_losses(p)
    store = R.load_store(p)
    h = R.health_frame(store.rows())
    assert sorted(set(h["d"])) == [2, 4] and set(h["field"]) == {
        "entropy_ratio",
        "top1_gate",
        "max_share",
        "min_share",
        "drop_frac",
    }
    # the stored health of the 4e model = router_health over the same windows under the paper's protocol
    ckpt = tmp_path / "replication" / "pretrain" / "4e-s0" / "checkpoint"
    model = checkpoint.load(ckpt).eval()
    val = open_corpus(prepare("tiny")).split("val")
    proto = R.protocols(p)[0]
    starts = R.eval_windows(len(val), model.config.block_size, p.eval_windows)
    probs, routed, processed = [], 0, 0
    for m in model.moe_layers():
        m.capacity_factor_eval, m.drop_tokens = proto.capacity_factor, proto.drop_tokens
    with torch.no_grad():
        for i in range(0, len(starts), proto.batch_size):
            s = starts[i : i + proto.batch_size]
            x = torch.from_numpy(np.asarray(val[s[:, None] + np.arange(model.config.block_size)], dtype=np.int64))
            model(x)
            (t,) = [t for t in model.telemetry() if t is not None]  # the one MoE layer (every other block)
            probs.append(t.router_probs)
            routed, processed = routed + t.routed_counts, processed + t.processed_counts
    want = router_health(torch.cat(probs), routed, processed)
    got = h[(h["d"] == 4) & (h["layer"] == 0)].set_index("field")["value"]
    assert got["entropy_ratio"] == pytest.approx(want.entropy_ratio, abs=1e-9)
    assert got["top1_gate"] == pytest.approx(want.top1_gate, abs=1e-9)
    assert got["max_share"] == pytest.approx(want.max_share) and got["drop_frac"] == pytest.approx(want.drop_frac)
    assert 0 < got["drop_frac"] < 1 and want.num_tokens == len(starts) * model.config.block_size

    rows = R.readouts(p)
    # every variant (the unreduced 4e, the scratch 2e, dense) and both reductions 4e -> 2e, on news
    assert len(rows) == 3 + 2 and set(rows["domain"]) == {"news"}
    df = store.rows(stage="zeroshot", task="corpus:val_news")
    base = df[(df["z"] == 4) & (df["d"] == 4) & (df["metric"] == "lm_loss")]["value"]
    direct = domain_lm_loss(model, open_corpus(prepare("tiny")).split("val_news"), 8, p.readout_eval_windows)
    assert len(base) == 1 and float(base.iloc[0]) == pytest.approx(direct["loss"], rel=1e-6)
    rec = df[df["metric"] == "recon_mapped"]
    assert sorted(rec["method"]) == ["freq_prune", "uncurl"] and (rec["value"] >= 0).all()
    for r in rec.itertuples():
        layers = json.loads(r.extra_json)["recon_mapped_layers"]
        assert len(layers) == 1 and layers[0] == pytest.approx(r.value, abs=1e-6)
    lm = R.readout_frame(store.rows(), 4)
    assert (
        set(lm.columns) == {"scratch", "uncurl", "freq_prune"} and lm.index.get_level_values("d").tolist().count(2) == 1
    )
    # idempotent: a second execution measures nothing again
    n = len(store.rows())
    again = R.readouts(p)
    assert len(store.rows()) == n + 1  # only the stage's wall-time row
    assert again.drop(columns="seed").equals(rows.drop(columns="seed"))
