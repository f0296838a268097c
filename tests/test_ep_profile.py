"""smoe-lab profile: expert-parallel inference profile on 2 gloo ranks (CPU), argument checks before any rank starts,
and the summary of the ranks' raw numbers (planted timings)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("deepspeed")

from smoe_lab import checkpoint  # noqa: E402
from smoe_lab.cli import main  # noqa: E402
from smoe_lab.config import ModelConfig  # noqa: E402
from smoe_lab.inference.ep_profile import (  # noqa: E402
    ProfileConfig,
    RankFailure,
    checkpoint_models,
    launch_group,
    preset_models,
    summarize,
    validate,
)
from smoe_lab.model import GPT  # noqa: E402

SHAPE = ["--set", "n_layer=2", "--set", "d_model=32", "--set", "n_head=2", "--set", "d_ff=64", "--set", "vocab_size=97"]


def test_profile_two_ranks_writes_one_row_per_model_and_rank_count(tmp_path, capsys):
    out = tmp_path / "prof"
    argv = ["profile", "--preset", "tiny", "--experts", "1,4", "--ranks", "1,2", "--ep-size", "2", "--out", str(out)]
    argv += [*SHAPE, "--seq-len", "16", "--warmup", "1", "--reps", "2", "--device", "cpu"]
    assert main(argv) == 0
    raw = pd.read_csv(out / "profile.csv", keep_default_na=False)  # empty cells stay ""
    assert list(raw.columns[:8]) == [
        "model", "experts", "ranks", "ep_size", "latency_ms", "all2all_ms", "expert_ms", "tokens_per_s"
    ]  # fmt: skip
    assert sorted(zip(raw["model"], raw["ranks"])) == [("4e", 1), ("4e", 2), ("dense", 1), ("dense", 2)]
    t = pd.read_csv(out / "profile.csv").set_index(["model", "ranks"])
    # one rank: no expert parallelism, so no all-to-all: the cell is empty, not zero
    assert raw.loc[(raw["model"] == "4e") & (raw["ranks"] == 1), "all2all_ms"].item() == ""
    assert math.isnan(t.loc[("4e", 1), "all2all_ms"]) and t.loc[("4e", 1), "ep_size"] == 1
    assert t.loc[("4e", 2), "all2all_ms"] > 0 and t.loc[("4e", 2), "ep_size"] == 2
    assert t.loc[("4e", 2), "all2all_wait_ms"] >= 0 and t.loc[("4e", 2), "all2all_transfer_ms"] >= 0
    assert math.isnan(t.loc[("dense", 2), "all2all_ms"]) and math.isnan(t.loc[("dense", 2), "expert_ms"])
    for r in (1, 2):
        row = t.loc[("4e", r)]
        assert row["expert_ms"] > 0 and row["latency_ms"] > 0 and row["tokens_per_s"] > 0
        assert row["latency_ms_q25"] <= row["latency_ms"] <= row["latency_ms_q75"]
        assert row["peak_mem_mb"] >= row["weights_mb"] > 0 and row["moe_layers"] == 1
    # experts are spread over the expert-parallel group: half of them, and fewer bytes, on each rank
    assert t.loc[("4e", 1), "local_experts"] == 4 and t.loc[("4e", 2), "local_experts"] == 2
    assert t.loc[("4e", 2), "params"] == t.loc[("4e", 1), "params"] == GPT(_cfg(4)).num_params()
    assert t.loc[("4e", 2), "params_per_rank"] < t.loc[("4e", 1), "params_per_rank"]
    assert t.loc[("dense", 2), "weights_mb"] == t.loc[("dense", 1), "weights_mb"]
    layers = pd.read_csv(out / "profile_layers.csv")
    assert len(layers) == 2 and set(layers["ranks"]) == {1, 2}
    meta = json.loads((out / "profile.json").read_text())
    assert meta["protocol"]["reps"] == 2 and "all2all_ms" in meta["columns"] and meta["machine"]["cpu_count"] >= 1
    assert "| 4e " in capsys.readouterr().out
    # --resume reuses both groups (same spec and code): nothing is launched again
    assert main([*argv, "--resume"]) == 0
    assert capsys.readouterr().out.count("reusing") == 2


def _cfg(e: int) -> ModelConfig:
    return ModelConfig.preset("tiny", n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=97, num_experts=e)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--experts", "9", "--ranks", "1,2", "--ep-size", "2"], "must divide the expert count"),
        (["--experts", "8", "--ranks", "1,2,4096", "--ep-size", "2"], "more ranks than allowed"),
        (["--experts", "8", "--ranks", "1,2", "--ep-size", "4"], "more than the largest rank count"),
        (["--experts", "8", "--ranks", "1,2,3", "--ep-size", "2"], "must divide every rank count"),
        (["--experts", "8,x"], "comma-separated integers"),
        (["--experts", "8", "--reps", "0"], "reps"),
    ],
)
def test_bad_arguments_fail_before_any_rank_starts(tmp_path, capsys, extra, match):
    out = tmp_path / "never"
    assert main(["profile", "--preset", "tiny", *extra, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smoe-lab: error:") and match in err[0], err
    assert not out.exists()


def test_checkpoint_checks(tmp_path):
    checkpoint.save(GPT(_cfg(4).replace(block_size=16)), tmp_path / "m" / "checkpoint")
    models = checkpoint_models([str(tmp_path / "m" / "checkpoint"), f"other={tmp_path / 'm' / 'checkpoint'}"])
    assert [m.label for m in models] == ["m", "other"] and models[0].experts == 4
    with pytest.raises(ValueError, match="block_size 16"):
        validate(models, ProfileConfig(ranks=[1, 2], seq_len=32), "cpu")
    with pytest.raises(ValueError, match="unique"):
        validate(models + models[:1], ProfileConfig(ranks=[1, 2], seq_len=16), "cpu")
    with pytest.raises(FileNotFoundError, match="not a smoe_lab checkpoint"):
        checkpoint_models([str(tmp_path / "nothing")])
    # a preset's position table grows to the sequence length (random weights); a checkpoint's never does
    assert preset_models("tiny", [4], 512)[0].model_config.block_size == 512


def test_a_failing_rank_names_its_log(tmp_path):
    spec = {"models": [{"label": "x", "config": {"bogus": 1}, "checkpoint": "", "experts": 1}], "ranks": 1}
    spec.update(ep_size=1, batch_size=1, seq_len=4, warmup=0, reps=1, device="cpu", dtype="float32", threads=1)
    spec.update(memory=False, seed=0)
    with pytest.raises(RankFailure, match=r"rank 0 exited .*log: .*r1-rank0\.log"):
        launch_group(spec, "r1", tmp_path, timeout_s=300)


def _planted_doc(reps: int = 4) -> dict:
    """Two ranks, one MoE layer; rank 1 always arrives 2 ms late at each all-to-all, which then takes 1 ms."""
    ranks = []
    for r in range(2):
        stages = [[[3.0 + 2 * (1 - r), 3.0 + 2 * (1 - r), 5.0 + r, 0.5, 14.0]] for _ in range(reps)]
        clock = []
        for k in range(reps):
            t0 = 100.0 + k
            enters = [t0 + 0.002 * r, t0 + 0.010 + 0.002 * r]  # seconds, host clock
            clock.append([[[e, max(t0 + 0.002, e - 0.002 * r + 0.002) + 0.001] for e in enters]])
        ranks.append(
            {
                "clean_ms": [10.0 + r + k for k in range(reps)],
                "instrumented_ms": [20.0] * reps,
                "stages_ms": stages,
                "a2a_clock_s": clock,
                "peak_bytes": 2.0**20 * (3 + r),
            }
        )
    model = {"label": "4e", "moe_layers": 1, "peak_source": "cpu-profiler", "ranks": ranks}
    model.update(weights_bytes=2**20, params_total=100, params_per_rank=60, local_experts=[2], block_size=16)
    spec = dict(ranks=2, ep_size=2, batch_size=2, seq_len=8, device="cpu", dtype="float32", threads=1, reps=reps)
    return {"spec": {**spec, "warmup": 1}, "models": [model]}


def test_summary_of_planted_timings():
    from smoe_lab.inference.ep_profile import ProfileModel

    rows, layers = summarize(_planted_doc(), [ProfileModel("4e", _cfg(4).to_dict())])
    row = rows[0]
    # latency of a pass = the slowest rank (rank 1: 11, 12, 13, 14 ms) -> median 12.5
    assert row["latency_ms"] == pytest.approx(12.5) and row["latency_ms_q25"] == pytest.approx(11.75)
    assert row["tokens_per_s"] == pytest.approx(np.median([2 * 2 * 8 / (x / 1000) for x in (11, 12, 13, 14)]))
    # stages: mean over ranks (all-to-all 5+5 on rank 0, 3+3 on rank 1 -> 8), experts (5+6)/2
    assert row["all2all_ms"] == pytest.approx(8.0) and row["expert_ms"] == pytest.approx(5.5)
    assert row["all2all_share_moe"] == pytest.approx(8 / 14) and row["non_moe_ms"] == pytest.approx(6.0)
    assert row["moe_other_ms"] == pytest.approx(14 - 8 - 5.5 - 0.5)
    # planted host clock: rank 0 waits 2 ms at each of the two all-to-alls, rank 1 none; exchange 1 ms each
    assert row["all2all_wait_ms"] == pytest.approx((2 + 2) / 2)
    assert row["all2all_transfer_ms"] == pytest.approx(2.0)
    assert row["peak_mem_mb"] == pytest.approx(4.0) and row["weights_mb"] == pytest.approx(1.0)
    assert layers[0]["all2all_ms"] == pytest.approx(8.0) and layers[0]["layer"] == 0
