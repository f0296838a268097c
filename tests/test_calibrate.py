import pytest
import torch

from smoe_lab.calibrate import Calibration, calibrate, check_compatible
from smoe_lab.model import GPT
from smoe_lab.reduce import router_similarity, similarity_from_gram


@pytest.fixture
def moe(tiny_cfg):
    return GPT(tiny_cfg.replace(n_layer=4, num_experts=[6, 4]), seed=0)


def _batches(n=3, b=2, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (b, t), generator=g) for _ in range(n)]


def test_gram_statistics_match_raw_logits(moe):
    cal = calibrate(moe, _batches(), max_sample=10_000)
    # reference: collect every router logit explicitly
    moe.eval()
    raw = [[] for _ in moe.moe_layers()]
    with torch.no_grad():
        for x in _batches():
            moe(x)
            for i, m in enumerate(moe.moe_layers()):
                raw[i].append(m.telemetry.router_logits.double())
    for i, s in enumerate(cal.layers):
        H = torch.cat(raw[i])  # [N, Z]
        assert s.n_tokens == H.shape[0] == 96
        assert torch.allclose(s.gram, H.T @ H, rtol=1e-6)
        assert torch.allclose(similarity_from_gram(s.gram), router_similarity(H), atol=1e-9)
        assert torch.equal(s.top1_counts, torch.bincount(H.argmax(1), minlength=H.shape[1]))
        assert abs(float(s.frequencies.sum()) - 1) < 1e-12
        assert s.logits_sample.shape == H.shape  # sample cap above N keeps everything


def test_padding_is_masked(moe):
    idx = torch.randint(0, 97, (2, 16))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :10] = True
    cal = calibrate(moe, [(idx, mask)])
    assert cal.layers[0].n_tokens == 20 and int(cal.layers[0].top1_counts.sum()) == 20


def test_reservoir_sample_is_capped_and_seeded(moe):
    a = calibrate(moe, _batches(n=5), max_sample=7, seed=1)
    b = calibrate(moe, _batches(n=5), max_sample=7, seed=1)
    assert a.layers[0].logits_sample.shape == (7, 6)
    assert torch.equal(a.layers[0].logits_sample, b.layers[0].logits_sample)


def test_artifact_roundtrip_and_manifest(tmp_path, moe):
    cal = calibrate(moe, _batches(), task="boolq", split="train")
    path = cal.save(tmp_path / "cal.safetensors")
    back = Calibration.load(path)
    assert back.manifest["task"] == "boolq" and back.manifest["tokens"] == 96
    assert back.experts_per_layer == [6, 4]
    for a, b in zip(cal.layers, back.layers):
        assert torch.equal(a.gram, b.gram) and torch.equal(a.top1_counts, b.top1_counts)
    check_compatible(back, moe)


def test_bad_calibration_input_is_a_clear_error(tiny_cfg, moe):
    with pytest.raises(ValueError, match="empty"):
        calibrate(moe, [])
    with pytest.raises(ValueError, match="LongTensors"):
        calibrate(moe, [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="block_size"):
        calibrate(moe, [torch.zeros(1, 17, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        calibrate(moe, [torch.full((1, 4), 97)])
    with pytest.raises(ValueError, match="no MoE layers"):
        calibrate(GPT(tiny_cfg), _batches())
    other = GPT(tiny_cfg.replace(n_layer=4, num_experts=[6, 4]), seed=1)
    with pytest.raises(ValueError, match="another checkpoint"):
        check_compatible(calibrate(moe, _batches()), other)
    with pytest.raises(FileNotFoundError, match="calibration artifact not found"):
        Calibration.load("/nonexistent/cal.safetensors")


def test_logit_recording_is_switched_on_for_calibration(moe):
    """A model whose record_logits is off (e.g. left so by a profiler) still gives the real Gram matrix, never
    zeros, and keeps its setting afterwards."""
    want = calibrate(moe, _batches())
    moe.set_record_logits(False)
    got = calibrate(moe, _batches())
    for a, b in zip(want.layers, got.layers):
        assert float(b.gram.abs().sum()) > 0 and torch.equal(a.gram, b.gram)
    assert [m.record_logits for m in moe.moe_layers()] == [False, False]


def test_truncated_or_wrong_artifacts_are_one_clear_error(moe, tmp_path):
    path = calibrate(moe, _batches()).save(tmp_path / "cal.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors.*(truncated|corrupted)"):
        Calibration.load(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="is a folder"):
        Calibration.load(tmp_path)
