"""Model-level reduction: planted structure recovery, compaction, identity, bad input."""

import numpy as np
import pytest
import torch
from planted import DM, D, Z, batches, planted_model
from sklearn.metrics import adjusted_rand_score

from smoe_lab.calibrate import calibrate
from smoe_lab.reduce import ExpertWeights, expert_forward
from smoe_lab.reduce.methods import METHODS, mcsmoe_dominants, reduce_model


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def _forward(e, x):
    return expert_forward(e, x)


def test_uncurl_recovers_planted_groups_and_their_functions():
    model, groups, bases = planted_model()
    new, report = reduce_model(model, "uncurl", D, batches(), router="merge")
    x = torch.randn(64, DM)
    for i, (lr, layer) in enumerate(zip(report.layers, new.moe_layers())):
        assert adjusted_rand_score(groups, lr.labels) == 1.0
        assert layer.num_experts == D
        for d in range(D):
            group = groups[lr.labels == d][0]
            merged = ExpertWeights(*(getattr(layer.experts, n)[d] for n in ("w_in", "b_in", "w_out", "b_out")))
            assert _rel_err(_forward(merged, x), _forward(bases[i][group], x)) < 1e-2
            assert lr.labels[lr.centres[d]] == d  # the centre is a member of its own cluster
        # S = (1+cos)/2 never drops below ~0.5 between groups, so lambda_2 - lambda_1 is always large; among
        # D >= 2 the largest gap sits after the D-th eigenvalue.
        gaps = np.diff(lr.eigenvalues)  # [Z-1], gaps[k-1] = lambda_{k+1} - lambda_k
        assert int(np.argmax(gaps[1:])) + 2 == D and lr.eigengap == pytest.approx(gaps[D - 1])
        assert set(lr.seconds) >= {"eigen", "kmeans", "align", "merge"}


@pytest.mark.parametrize("method", ["freq_merge", "mcsmoe", "hybrid"])
def test_other_merging_methods_run_on_planted_model(method):
    model, groups, _ = planted_model()
    new, report = reduce_model(model, method, D, batches())
    assert sum(x.num_experts for x in new.moe_layers()) == D * 2
    for lr in report.layers:
        if lr.method == "freq_prune":  # hybrid prunes the first MoE layer greedily
            assert method == "hybrid" and lr.layer == 0 and (lr.labels >= 0).sum() == D
            continue
        assert (lr.labels >= 0).all()  # merges keep every expert somewhere
        assert sorted(set(lr.labels.tolist())) == list(range(lr.experts_after))
    if method == "hybrid":
        assert [lr.method for lr in report.layers] == ["freq_prune", "uncurl"]
        assert adjusted_rand_score(groups, report.layers[1].labels) == 1.0


def test_reduce_to_same_size_is_identity():
    model, _, _ = planted_model()
    new, _ = reduce_model(model, "uncurl", Z, batches(), router="keep")
    idx = torch.randint(0, 97, (2, 16))
    model.eval(), new.eval()
    assert torch.allclose(model(idx), new(idx), atol=1e-6)


def test_compaction_halves_expert_parameters_and_records_map(tmp_path):
    from smoe_lab import checkpoint

    model, _, _ = planted_model()
    new, report = reduce_model(model, "freq_prune", Z // 2, batches(), router="keep")

    def expert_params(m):
        return sum(p.numel() for layer in m.moe_layers() for p in layer.experts.parameters())

    assert expert_params(new) * 2 == expert_params(model)
    assert new.config.num_experts == [Z // 2, Z // 2]
    for layer_map, lr in zip(new.config.expert_map, report.layers):
        assert layer_map == lr.labels.tolist() and sum(v >= 0 for v in layer_map) == Z // 2
    checkpoint.save(model, tmp_path / "a")
    checkpoint.save(new, tmp_path / "b")
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "b") < size(tmp_path / "a")
    back = checkpoint.load(tmp_path / "b")
    assert [x.num_experts for x in back.moe_layers()] == [Z // 2, Z // 2]


def test_freq_prune_keeps_most_frequent_and_pruned_router_rows():
    model, _, _ = planted_model()
    cal = calibrate(model, batches())
    new, report = reduce_model(model, "freq_prune", 4, cal, router="keep")
    for lr, old, layer in zip(report.layers, model.moe_layers(), new.moe_layers()):
        top = np.argsort(-lr.frequencies, kind="stable")[:4]
        assert sorted(lr.centres) == sorted(top.tolist())
        assert torch.equal(layer.router.weight, old.router.weight[lr.centres])
        assert torch.equal(layer.experts.w_in, old.experts.w_in[lr.centres])


def test_one_calibration_serves_every_method_and_target():
    model, _, _ = planted_model()
    cal = calibrate(model, batches())
    for method in METHODS:
        for d in (6, 3, 1):
            new, report = reduce_model(model, method, d, cal)
            assert report.seconds["calibrate"] == 0.0
            assert sum(new.config.experts_per_layer) == 2 * d


def test_router_reinit_is_seeded_and_gpt2_scaled():
    model, _, _ = planted_model()
    cal = calibrate(model, batches())
    a, _ = reduce_model(model, "uncurl", 3, cal, seed=5)
    b, _ = reduce_model(model, "uncurl", 3, cal, seed=5)
    w = a.moe_layers()[0].router.weight
    assert torch.equal(w, b.moe_layers()[0].router.weight)
    assert abs(w.std().item() - 0.02) < 0.01


def test_mcsmoe_dominants_global_choice():
    freqs = [np.array([0.5, 0.3, 0.2]), np.array([0.9, 0.05, 0.05])]
    # each layer's top first (L0:0, L1:0), then the most frequent of the rest anywhere: L0:1 (0.3), L0:2 (0.2)
    assert mcsmoe_dominants(freqs, 4) == [[0, 1, 2], [0]]
    with pytest.raises(ValueError, match="at least one expert per layer"):
        mcsmoe_dominants(freqs, 1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="uncurl", num_experts=Z + 1), r"must be in \[1, Z=12\]"),
        (dict(method="uncurl", num_experts=0), r"must be in \[1, Z=12\]"),
        (dict(method="uncurl", num_experts=[3]), "lists 1 layers"),
        (dict(method="kmeans", num_experts=3), "unknown reduction method"),
        (dict(method="uncurl", num_experts=3, router="random"), "unknown router option"),
        (dict(method="uncurl", num_experts=3, routr="keep"), "unknown option"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, match):
    model, _, _ = planted_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        reduce_model(model, calibration=batches(), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_empty_or_foreign_calibration_is_rejected():
    model, _, _ = planted_model()
    with pytest.raises(ValueError, match="empty"):
        reduce_model(model, "uncurl", 3, [])
    other, _, _ = planted_model(seed=1)
    with pytest.raises(ValueError, match="another checkpoint"):
        reduce_model(model, "uncurl", 3, calibrate(other, batches()))
