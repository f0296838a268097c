import math
import warnings

import pytest
import torch

from smoe_lab.calibrate import Calibration, calibrate
from smoe_lab.model import GPT
from smoe_lab.reduce import reduce_model
from smoe_lab.router_health import (
    HealthMeter,
    health_from_logits,
    last_health,
    metered,
    router_health,
    specialisation_warning,
)


def test_uniform_and_one_hot_routers():
    n, e = 64, 8
    uniform = router_health(torch.full((n, e), 1.0 / e))
    assert uniform.entropy == pytest.approx(math.log(e)) and uniform.entropy_ratio == pytest.approx(1.0)
    assert uniform.top1_gate == pytest.approx(1 / e) and not uniform.specialised()
    # one-hot rows on experts 0..3 only: entropy 0, gate 1, half the experts unused
    hot = torch.zeros(n, e)
    hot[torch.arange(n), torch.arange(n) % 4] = 1.0
    h = router_health(hot)
    assert h.entropy_ratio == pytest.approx(0.0, abs=1e-9) and h.top1_gate == pytest.approx(1.0)
    assert h.max_share == pytest.approx(0.25) and h.min_share == 0.0 and h.drop_frac == 0.0
    assert router_health(torch.ones(5, 1)).entropy_ratio == 0.0  # one expert: nothing to choose


def test_meter_over_batches_equals_one_pass(tiny_cfg):
    model = GPT(tiny_cfg.replace(num_experts=4), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 97, (2, 16), generator=g) for _ in range(3)]
    meter = HealthMeter()
    probs, routed, processed = [], [], []
    with torch.no_grad():
        for x in metered(batches, model, meter):
            model(x)
            t = model.telemetry()[0]
            probs.append(t.router_probs)
            routed.append(t.routed_counts)
            processed.append(t.processed_counts)
    got = meter.result()[0]
    want = router_health(torch.cat(probs), sum(routed), sum(processed))
    assert got.num_tokens == want.num_tokens == 96
    for k in ("entropy", "top1_gate", "max_share", "min_share", "drop_frac"):
        assert getattr(got, k) == pytest.approx(getattr(want, k), rel=1e-9, abs=1e-12)
    # the telemetry's own property agrees with the stored entropy / drop fraction
    assert t.health.entropy == pytest.approx(t.router_entropy, rel=1e-5)
    assert t.health.drop_frac == pytest.approx(t.dropped_fraction)


def test_calibration_health_matches_logits_and_survives_save_load(tiny_cfg, tmp_path):
    model = GPT(tiny_cfg.replace(num_experts=4, capacity_factor_eval=8.0), seed=1)
    batches = [torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    cal = calibrate(model, batches, max_sample=10_000)
    h = cal.layers[0].health
    want = health_from_logits(cal.layers[0].logits_sample.double())  # every row kept (cap > N)
    assert h.entropy == pytest.approx(want.entropy, rel=1e-6) and h.top1_gate == pytest.approx(want.top1_gate)
    assert h.max_share == pytest.approx(want.max_share) and h.drop_frac == 0.0
    back = Calibration.load(cal.save(tmp_path / "c.safetensors")).layers[0].health
    assert back == h


def test_warning_threshold_and_text():
    assert specialisation_warning([0.79, 0.8]) is None
    msg = specialisation_warning([0.5, 0.93])
    assert "routers did not specialise" in msg and "1/E of an FFN" in msg and "layer 1: 0.93" in msg
    assert "layer 0" not in msg


def test_last_health_prefers_the_last_evaluation():
    rows = [
        {"kind": "train", "step": 1, "entropy_ratio": [0.9], "top1_gate": [0.2]},
        {"kind": "eval", "step": 1, "val_loss": 5.0, "entropy_ratio": [0.7], "top1_gate": [0.4]},
        {"kind": "train", "step": 2, "entropy_ratio": [0.6], "top1_gate": [0.5]},
    ]
    assert last_health(rows)["entropy_ratio"] == [0.7]
    assert last_health(rows[::2])["top1_gate"] == [0.5]
    assert last_health([{"kind": "train", "loss": 1.0}]) == {}


def test_reduction_report_carries_health_and_warns_for_uniform_routers(tiny_cfg):
    model = GPT(tiny_cfg.replace(num_experts=4), seed=0)  # fresh init: near-uniform routers
    batches = [torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    with pytest.warns(UserWarning, match="routers did not specialise"):
        _, rep = reduce_model(model, "freq_prune", 2, batches)
    assert rep.warning and rep.layers[0].health.entropy_ratio > 0.8
    summary = rep.summary()[0]
    assert {"router_entropy_ratio", "router_top1_gate", "router_max_share", "router_min_share"} <= set(summary)
    assert rep.to_dict()["warning"] == rep.warning
    # a specialised router (large router weights): no warning
    with torch.no_grad():
        model.moe_layers()[0].router.weight.mul_(2000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, rep = reduce_model(model, "freq_prune", 2, batches)
    assert rep.warning is None and rep.layers[0].health.entropy_ratio < 0.2
