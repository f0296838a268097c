"""Replication study (notebook 05): the verdict rule, pooling, the eval protocols and the report generator."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from smoe_lab import replication as R
from smoe_lab.config import ModelConfig
from smoe_lab.model import GPT
from smoe_lab.notebook_params import ReplicationNotebook
from smoe_lab.results import ResultsStore


# -- the verdict rule ----------------------------------------------------------------------------------------------
def test_verdict_rule_on_hand_made_numbers():
    # mean 1.0, sd 0.1, n 3 -> SE 0.0577: far beyond 2 SE in the claimed direction
    v, est = R.verdict([0.9, 1.0, 1.1])
    assert v == R.SUPPORTED and est.n == 3 and est.mean == pytest.approx(1.0)
    assert est.se == pytest.approx(0.1 / math.sqrt(3))
    assert R.verdict([-0.9, -1.0, -1.1])[0] == R.NOT_SUPPORTED
    # mean 0.2, sd 0.3: the interval [0.2 - 2*0.173, 0.2 + 2*0.173] straddles 0
    assert R.verdict([-0.1, 0.2, 0.5])[0] == R.INCONCLUSIVE
    # exactly at the boundary is not enough: mean 2, SE 1 with k = 2 gives m - 2 SE = 0, not > 0
    vals = [2 - math.sqrt(3), 2.0, 2 + math.sqrt(3)]  # sd sqrt(3) -> SE 1
    assert R.verdict(vals)[0] == R.INCONCLUSIVE
    assert R.verdict(vals, se_factor=1.9)[0] == R.SUPPORTED
    # one seed, or no spread estimate: never decides
    assert R.verdict([5.0])[0] == R.INCONCLUSIVE
    assert R.verdict([])[0] == R.INCONCLUSIVE
    assert R.verdict([1.0, float("nan")])[0] == R.INCONCLUSIVE  # NaN dropped -> n 1


def test_non_inferiority_margin():
    # "competitive": slightly worse on average but within the margin of 1 point
    assert R.verdict([-0.3, -0.2, -0.1], margin=1.0)[0] == R.SUPPORTED
    assert R.verdict([-0.3, -0.2, -0.1], margin=0.0)[0] == R.NOT_SUPPORTED
    # clearly worse than the margin
    assert R.verdict([-3.0, -2.9, -3.1], margin=1.0)[0] == R.NOT_SUPPORTED
    assert R.verdict([-1.5, -0.5, 0.5], margin=1.0)[0] == R.INCONCLUSIVE


def test_combine_and_seeds_needed():
    assert R.combine([R.SUPPORTED, R.SUPPORTED]) == R.SUPPORTED
    assert R.combine([R.SUPPORTED, R.INCONCLUSIVE]) == R.INCONCLUSIVE
    assert R.combine([R.SUPPORTED, R.NOT_SUPPORTED, R.INCONCLUSIVE]) == R.NOT_SUPPORTED
    assert R.combine([]) == R.INCONCLUSIVE
    # mean 0.2, sd 0.3, k 2: n > (2 * 0.3 / 0.2)^2 = 9
    est = R.Estimate.of([-0.1, 0.2, 0.5])
    assert R.seeds_needed(est) == 9
    assert R.seeds_needed(R.Estimate.of([0.0, 0.0])) is None


def test_compare_pools_paired_cells_and_drops_incomplete_seeds():
    idx = pd.MultiIndex.from_tuples(
        [(t, d, s) for t in ("a", "b") for d in (8, 4) for s in (0, 1, 2)], names=["task", "d", "seed"]
    )
    frame = pd.DataFrame({"uncurl": 0.6, "freq_prune": 0.5}, index=idx)
    frame.loc[("a", 8, 0), "uncurl"] = 0.64  # seed 0: cells +14, +10, +10, +10 points -> mean 11
    frame.loc[("b", 4, 2), "freq_prune"] = np.nan  # seed 2 misses a cell: left out of the pooled value
    part = R.compare(frame, "uncurl", "freq_prune", "u vs f", se_factor=2.0)
    assert list(part.per_seed.index) == [0, 1]
    assert part.per_seed.loc[0] == pytest.approx(11.0) and part.per_seed.loc[1] == pytest.approx(10.0)
    assert part.est.n == 2 and part.verdict == R.SUPPORTED
    cell = part.cells.set_index(["task", "D"])
    assert cell.loc[("b", 4), "n"] == 2 and cell.loc[("a", 8), "mean"] == pytest.approx(11.333, abs=1e-3)
    # lower is better flips the sign; ds restricts the cells
    loss = R.compare(frame, "uncurl", "freq_prune", "x", 2.0, scale=1.0, lower_is_better=True, ds=[8])
    assert set(loss.cells["D"]) == {8} and loss.est.mean < 0 and loss.verdict == R.NOT_SUPPORTED
    assert R.compare(frame, "uncurl", "mcsmoe", "x", 2.0) is None


# -- parameters ----------------------------------------------------------------------------------------------------
def _params(tmp_path, **kw):
    base = dict(
        variants=[1, 8, 32],
        seeds=[0, 1, 2],
        tasks=["cloze-news", "boolq"],
        targets=[16, 8, 4, 2],
        out_dir=str(tmp_path),
    )
    return ReplicationNotebook(**{**base, **kw})


def test_params_map_onto_notebooks_01_and_03(tmp_path):
    p = _params(tmp_path)
    pre = p.pretrain_notebook(2)
    assert pre.seed == 2 and pre.variants == [1, 8, 32] and pre.out_dir == str(tmp_path / "replication")
    pr = p.pruning_notebook(1)
    assert pr.base_variant == "32e" and pr.reference_variants == ["dense", "8e"] and pr.seed == 1
    assert [x.name for x in R.protocols(p)] == ["cf1/b32", "nodrop/b32", "cf1.25/b32", "cf2/b32", "cf1/b8", "cf1/b128"]
    assert R.report_path(p) == tmp_path / "replication" / "replication.md"
    with pytest.raises(ValueError, match="05_replication.targets"):
        _params(tmp_path, targets=[32])
    with pytest.raises(ValueError, match="05_replication.seeds"):
        _params(tmp_path, seeds=[0, 0])
    with pytest.raises(ValueError, match="05_replication.variants"):
        _params(tmp_path, variants=[1])


# -- the evaluation protocols --------------------------------------------------------------------------------------
def test_lm_loss_protocols_fixed_windows_and_restored_settings():
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, vocab_size=64, block_size=16, num_experts=8)
    model = GPT(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, 64, size=16 * 40 + 1).astype(np.uint16)
    starts = R.eval_windows(len(tokens), 16, windows=0)
    assert len(starts) == 40 and starts[1] - starts[0] == 16
    assert len(R.eval_windows(len(tokens), 16, windows=10)) == 10
    nodrop = [R.lm_loss(model, tokens, starts, R.Protocol("n", 1.0, False, b)) for b in (4, 40)]
    drop = [R.lm_loss(model, tokens, starts, R.Protocol("d", 1.0, True, b)) for b in (4, 40)]
    # without drops the loss does not depend on which windows share a batch; with drops it does
    assert nodrop[0]["loss"] == pytest.approx(nodrop[1]["loss"], abs=1e-5)
    assert nodrop[0]["drop_frac"] == 0.0 and drop[0]["drop_frac"] > 0.0
    assert drop[0]["loss"] != pytest.approx(drop[1]["loss"], abs=1e-6)
    assert nodrop[0]["tokens"] == 40 * 16
    # token-weighted mean over the windows = the loss of one batch holding them all (no drops)
    x = torch.from_numpy(tokens[starts[:, None] + np.arange(17)].astype(np.int64))
    for m in model.moe_layers():
        m.drop_tokens = False
    model.eval()
    with torch.no_grad():
        ref = float(model(x[:, :-1], x[:, 1:])[1])
    assert nodrop[1]["loss"] == pytest.approx(ref, abs=1e-5)
    for m in model.moe_layers():
        m.drop_tokens = True
    R.lm_loss(model, tokens, starts, R.Protocol("c", 2.0, False, 8))
    assert all(m.drop_tokens and m.capacity_factor_eval == 1.0 for m in model.moe_layers())


# -- the report from a hand-made results store ---------------------------------------------------------------------
def _fill_store(store: ResultsStore, p, uncurl_acc=0.66, skip=(), majority=None):
    """Rows as the study writes them: pretraining losses (dense > 8e > 32e), curves, floors, task accuracies and
    validation losses. skip: (task, seed, method, d) finetuning results to leave out."""
    rng = np.random.default_rng(0)
    rows = []
    for s in p.seeds:
        for e, loss in ((1, 5.00), (8, 4.90), (32, 4.80)):
            ident = dict(base_model="tiny", method="none", z=e, d=e, task=R.PRETRAIN_TASK, seed=s)
            for proto in R.protocols(p):
                v = loss + rng.normal(0, 0.005) + (0.05 if proto.drop_tokens and e > 1 else 0.0)
                rows.append({**ident, "stage": "pretrain", "metric": f"val_loss:{proto.name}", "value": v})
                drop = 0.1 if proto.drop_tokens and e > 1 and proto.capacity_factor == 1.0 else 0.0
                rows.append({**ident, "stage": "pretrain", "metric": f"drop_frac:{proto.name}", "value": drop})
            for m, v in (("params", 1e6 * e), ("active_params", 1e6), ("tokens_per_s", 12000.0)):
                rows.append({**ident, "stage": "pretrain", "metric": m, "value": v})
            for t in p.ablation_tokens if s < 2 else []:  # the retrained budgets: 32e - dense -0.15 (drops), -0.2
                for proto in R.protocols(p)[:2]:
                    v = loss - 0.1 + (0.05 * (e > 1) if proto.drop_tokens else 0.0) + 0.01 * s
                    budget = {**ident, "stage": "budget", "metric": f"val_loss:{proto.name}@{t}", "value": v}
                    rows.append({**budget, "extra": {"tokens": t}})
            for step, tokens in ((50, 200000), (100, 400000)):
                v = loss + (0.1 if step == 50 and e > 1 else 0.0)
                curve = {**ident, "stage": "curve", "metric": "val_loss", "value": v}
                rows.append({**curve, "extra": {"step": step, "tokens": tokens}})
        for task in p.tasks:
            for metric, v in (("chance", 0.25), ("majority", (majority or {}).get(task, 0.30))):
                floor = dict(base_model="tiny", method="none", z=1, d=1, task=task, stage="floor", seed=s)
                rows.append({**floor, "metric": metric, "value": v})
            models = [("none", e, e, 0.40 + 0.15 * (e == 8) + 0.2 * (e == 32)) for e in (1, 8, 32)]
            acc = {"uncurl": uncurl_acc, "freq_prune": 0.50, "freq_merge": 0.55, "mcsmoe": 0.655, "hybrid": 0.66}
            models += [(m, 32, d, a) for m, a in acc.items() for d in p.targets]
            for method, z, d, a in models:
                if (task, s, method, d) in skip:
                    continue
                noise = rng.normal(0, 0.01) + (0.03, -0.03, 0.01)[s] * (method == "hybrid")
                ident = dict(base_model="tiny", method=method, z=z, d=d, task=task, stage="stage2", seed=s)
                rows.append({**ident, "metric": "accuracy", "value": a + noise, "seconds": 10.0})
                rows.append({**ident, "metric": "loss", "value": 2.0 - a + noise})
                if task in p.zero_shot_tasks:  # without finetuning: every reduction 20 points lower, uncurl 30
                    zs = a - (0.3 if method == "uncurl" else 0.2 if z > d else 0.0) + noise
                    rows.append({**ident, "stage": "zeroshot", "metric": "accuracy", "value": zs})
                    rows.append({**ident, "stage": "zeroshot", "metric": "loss", "value": 2.0 - zs})
    wall = dict(base_model="tiny", method="none", z=1, d=1, task=R.RUN_TASK, stage="wall:tasks", seed=0)
    rows.append({**wall, "metric": "wall_seconds", "value": 600.0})
    store.append_many(rows)


def test_claims_and_report_from_a_hand_made_store(tmp_path):
    p = _params(
        tmp_path, budget_note="Chosen by measurement.", ablation_tokens=[2_400_000], zero_shot_tasks=["cloze-news"]
    )
    store = R.load_store(p)
    _fill_store(store, p)
    claims = {c.key: c for c in R.evaluate_claims(store.rows(), p)}
    assert claims["a"].verdict == R.SUPPORTED  # dense 5.00 > 8e 4.90 > 32e 4.80, sd 0.007
    assert [x.name for x in claims["a"].parts] == ["8e vs dense", "32e vs 8e"]
    assert claims["a"].parts[0].est.mean == pytest.approx(0.05, abs=0.02)  # drops cost the MoE 0.05 here
    assert claims["a"].secondary[0].est.mean == pytest.approx(0.10, abs=0.02)  # no drops: the full 0.10
    assert claims["b"].verdict == R.SUPPORTED  # scratch 8e 55 vs freq_prune 50
    assert claims["b"].parts[0].cells["D"].tolist() == [8, 8]  # only D = 8 has a scratch model
    assert claims["c"].verdict == R.SUPPORTED  # 66 vs 50 / 55, and 66 vs 65.5 within the 1-point margin
    assert claims["d"].verdict == R.INCONCLUSIVE and "untested" in claims["d"].note  # no scratch 4e / 2e
    assert claims["d"].parts[0].verdict == R.SUPPORTED  # 32e -> 8e (4x) keeps it: 66 vs 55
    assert claims["e"].verdict == R.INCONCLUSIVE  # hybrid = uncurl + (3, -3, 1) points by seed

    bt = R.budget_table(store.rows(), p).set_index(["protocol", "tokens per model"])
    assert bt.loc[("cf1/b32", 1_200_000), "seeds"] == "0,1,2" and bt.loc[("cf1/b32", 2_400_000), "seeds"] == "0,1"
    assert bt.loc[("cf1/b32", 2_400_000), "32e - dense (nats)"].startswith("-0.150")
    assert bt.loc[("nodrop/b32", 2_400_000), "32e - dense (nats)"].startswith("-0.200")
    assert bt.loc[("nodrop/b32", 2_400_000), "MoE lower (verdict)"] == R.SUPPORTED

    out = R.write_report(p)
    text = (tmp_path / "replication" / "replication.md").read_text()
    assert out["verdicts"] == {k: c.verdict for k, c in claims.items()}
    assert "PARTIAL" not in text
    assert "## (a) At equal active parameters" in text and "**supported**" in text
    assert "## (d) A pruning-factor threshold: **inconclusive**" in text
    assert "Chosen by measurement." in text and "| total" in text
    assert "tiny+(32e->8e)" in text and "(+)" in text  # the paper's layout with marks
    assert "Verdict rule (mechanical)" in text
    assert "Retrained with 2,400,000 tokens (seeds 0,1)" in text
    zs = {c.key: c.verdict for c in R.evaluate_claims(store.rows(), p, stage="zeroshot")}
    assert zs["c"] == R.NOT_SUPPORTED and zs["e"] == R.SUPPORTED  # uncurl 10 points below the other reductions
    assert "Ablation without finetuning (cloze-news; router `merge`" in text and "gives **not supported**" in text
    pngs = {x.rsplit("/", 1)[-1] for x in out["figures"]}
    assert {"claims_forest.png", "pretrain_val_loss.png", "accuracy_boolq.png", "ablation_budget.png"} <= pngs
    assert all((tmp_path / "replication" / "replication" / f).stat().st_size > 5000 for f in pngs)


def test_report_flags_failures_and_partial_runs(tmp_path):
    p = _params(tmp_path)
    store = R.load_store(p)
    skip = {("boolq", 2, "hybrid", 2)}
    _fill_store(store, p, uncurl_acc=0.45, skip=skip)  # UNCURL now below every baseline
    df = store.rows()
    claims = {c.key: c for c in R.evaluate_claims(df, p)}
    assert claims["c"].verdict == R.NOT_SUPPORTED
    assert claims["d"].verdict == R.NOT_SUPPORTED  # 4x loses against the 8e scratch model (45 vs 55)
    assert claims["e"].verdict == R.SUPPORTED  # hybrid 66 vs uncurl 45
    assert list(claims["e"].parts[0].per_seed.index) == [0, 1]  # seed 2 misses a cell
    comp = R.completeness(df, p)
    assert comp["finetune"] == (2 * 3 * (3 + 20) - 1, 2 * 3 * (3 + 20)) and not comp["complete"]
    assert comp["missing"] == ["boolq seed 2 hybrid 32e->2e"]
    text = R.render_report(df, p)  # no figures
    assert "PARTIAL REPORT" in text and "boolq seed 2 hybrid 32e->2e" in text
    assert "## (c) UNCURL beats greedy pruning" in text and "**not supported** at this scale" in text


def test_floor_rule_leaves_out_a_task_no_model_learns(tmp_path):
    p = _params(tmp_path)
    store = R.load_store(p)
    _fill_store(store, p, uncurl_acc=0.45, majority={"boolq": 0.70})  # every boolq model below its majority class
    df = store.rows()
    assert R.learnable_tasks(df, p) == ["cloze-news"]
    kept = {c.key: c for c in R.evaluate_claims(df, p)}
    every = {c.key: c for c in R.evaluate_claims(df, p, tasks=p.tasks)}
    assert set(kept["c"].parts[0].cells["task"]) == {"cloze-news"}
    assert set(every["c"].parts[0].cells["task"]) == {"cloze-news", "boolq"}
    text = R.render_report(df, p)
    assert "Here the rule drops boolq" in text and "With every task, boolq included (no floor rule)" in text


def test_task_figure_has_floors_intervals_over_seeds_and_one_class_flag(tmp_path):
    p = _params(tmp_path)
    store = R.load_store(p)
    _fill_store(store, p)
    df = store.rows()
    fig = R.figure_task(df, "boolq", p)
    notes = [a.text for a in fig.layout.annotations]
    assert any(t.startswith("majority class") for t in notes) and any(t.startswith("chance") for t in notes)
    assert "3 seed(s)" in fig.layout.title.text and "n unknown" in fig.layout.title.text  # rows carry no n_report
    series = [t for t in fig.data if t.name in set(p.methods) | {"trained from scratch"}]
    assert series and all(len(t.error_y.array) == len(t.y) for t in series)
    assert any(h > 0 for t in series for h in t.error_y.array)  # t intervals over the 3 seeds
    # a model that answers one class for every example is crossed out; n from the store's extra is in the title
    rows = R.figures.task_rows(df, "boolq", max(p.variants))
    assert len(rows) and rows["n_eval"].isna().all()
    one = rows.iloc[0]
    ident = dict(base_model="tiny", method=one["method"] if one["method"] != "none" else "none", z=int(one["z"]),
                 d=int(one["d"]), task="boolq", stage="stage2")  # fmt: skip
    for seed in sorted(rows["seed"].unique()):
        store.append_many([{**ident, "seed": int(seed), "metric": "accuracy", "value": 0.62,
                            "extra": {"n_report": 256, "top_pred_share": 1.0}}])  # fmt: skip
    fig = R.figure_task(store.rows(), "boolq", p)
    assert "n=256" in fig.layout.title.text
    assert [t for t in fig.data if t.name.startswith("same answer for")]
