"""Notebook 04's inference stages without launching ranks: finding notebook 03's reductions, the payoff table, the
Fig 2b numbers and the figures (titles state the protocol and that CPU numbers are not GPU numbers)."""

import numpy as np
import pandas as pd
import pytest

from smoe_lab import checkpoint
from smoe_lab.config import ModelConfig
from smoe_lab.inference import figures
from smoe_lab.inference.study import dense_equivalents, payoff_table, reduced_checkpoints
from smoe_lab.model import GPT
from smoe_lab.results import ResultsStore


def _cfg(e):
    return ModelConfig.preset("tiny", n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=97, num_experts=e)


def _profile() -> pd.DataFrame:
    rows = []
    for ranks, ep in ((1, 1), (2, 2)):
        for model, e, lat in (("dense", 1, 5.0), ("2e", 2, 6.0), ("8e", 8, 9.0), ("8e->2e uncurl", 2, 6.1)):
            a2a = np.nan if ep == 1 or e == 1 else 1.0 + e / 8
            rows.append(
                dict(model=model, experts=e, ranks=ranks, ep_size=ep, latency_ms=lat * ranks, latency_ms_q25=lat,
                     latency_ms_q75=lat * ranks + 1, tokens_per_s=1000 / lat, all2all_ms=a2a, all2all_ms_q25=a2a,
                     all2all_ms_q75=a2a, all2all_wait_ms=a2a / 2, all2all_transfer_ms=a2a / 2,
                     expert_ms=np.nan if e == 1 else 0.1 * e, expert_ms_q25=0.1, expert_ms_q75=0.2 * e,
                     gate_ms=0.1, moe_other_ms=0.1, moe_layers=0 if e == 1 else 1, peak_mem_mb=1.0 + e,
                     weights_mb=0.5 + e / 2, params=100 * e, batch_size=2, seq_len=16, device="cpu",
                     backend="gloo", dtype="float32", oversubscribed=False, val_loss=5 - 0.1 * e)
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_reduced_checkpoints_found_by_parent_and_method(tmp_path):
    base = tmp_path / "pretrain" / "8e-s0" / "checkpoint"
    checkpoint.save(GPT(_cfg(8)), base)
    for method in ("uncurl", "freq_prune"):
        meta = {"kind": "reduced", "parent": str(base), "method": method}
        checkpoint.save(GPT(_cfg(2)), tmp_path / "reduced" / f"8e-s0-boolq-{method}-D2", **meta)
    other = {"kind": "reduced", "parent": str(tmp_path / "pretrain" / "4e-s0" / "checkpoint"), "method": "uncurl"}
    checkpoint.save(GPT(_cfg(2)), tmp_path / "reduced" / "4e-s0-boolq-uncurl-D2", **other)
    found = reduced_checkpoints(tmp_path, base, ["uncurl"])
    assert [(m, d, p.name) for m, d, p in found] == [("uncurl", 2, "8e-s0-boolq-uncurl-D2")]
    assert len(reduced_checkpoints(tmp_path, base, ["uncurl", "freq_prune"])) == 2


def test_payoff_table_puts_base_reduced_and_scratch_side_by_side(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    common = dict(base_model="tiny", task="boolq", stage="stage2", metric="accuracy", seed=0)
    store.append(**common, method="none", z=8, d=8, value=0.70)
    store.append(**common, method="uncurl", z=8, d=2, value=0.66)
    store.append(**common, method="none", z=2, d=2, value=0.60)
    t = payoff_table(_profile(), "8e", [("uncurl", 2, "8e->2e uncurl")], tmp_path)
    two = t[t["ranks"] == 2].set_index("model")
    assert list(two.index) == ["8e", "8e->2e uncurl", "2e"]
    assert list(two["kind"]) == ["unreduced base", "reduced (uncurl)", "trained from scratch"]
    assert two.loc["8e", "latency_vs_base"] == 1.0
    assert two.loc["8e->2e uncurl", "latency_vs_base"] == pytest.approx(6.1 / 9.0)
    assert two.loc["8e->2e uncurl", "peak_mem_vs_base"] == pytest.approx(3.0 / 9.0)
    assert list(two["accuracy_boolq"]) == [0.70, 0.66, 0.60]
    assert set(t["ranks"]) == {1, 2}


def test_dense_equivalents_and_figures(tmp_path):
    prof = _profile()
    variants = prof[(prof["ranks"] == 1) & prof["model"].isin(["dense", "2e", "8e"])][["model", "experts", "val_loss"]]
    table = dense_equivalents(variants.assign(backbone_params=1e6))
    ours = table[table["backbone"].str.startswith("this run")]
    assert list(ours["experts"]) == [1, 2, 8] and ours["extrapolated"].all()
    assert ours["measured_val_loss"].tolist() == pytest.approx([4.9, 4.8, 4.2])
    assert (table[table["backbone"] == "paper: 354M"]["dense_equivalent_ratio"] > 1).all()
    payoff = payoff_table(prof, "8e", [("uncurl", 2, "8e->2e uncurl")], tmp_path)  # no results store: no accuracy
    scaling = prof[prof["model"] == "8e"]
    figs = [
        figures.fig2a_loss_vs_latency(prof),
        figures.fig4_all2all_vs_experts(prof),
        figures.fig5_latency_vs_ranks(scaling),
        figures.payoff_bars(payoff, prof),
    ]
    for fig in figs:
        title = fig.layout.title.text
        assert "CPU numbers are not GPU numbers" in title and "batch 2/rank x 16 tokens" in title
    fig4 = figs[1]
    assert [tr.name for tr in fig4.data][:2] == ["all-to-all: waiting for the group", "all-to-all: exchange"]
    assert list(fig4.data[0].x) == ["2e", "8e"]  # the reduced model's shapes are 2e's: Fig 4 is per expert count
    assert "Clark et al. 2022" in figures.fig2b_dense_equivalent(table).layout.annotations[0].text
