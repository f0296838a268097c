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
def _fill_store(store: ResultsStore, p, uncurl_acc=0.66, skip=(), majority=None, scratch_acc=None, uncurl_by_d=None):
    """Rows as the study writes them: pretraining losses (dense > 8e > 32e), curves, floors, task accuracies and
    validation losses. skip: (task, seed, method, d) finetuning results to leave out. scratch_acc {e: accuracy} and
    uncurl_by_d {d: accuracy} replace the default accuracies of those models."""
    rng = np.random.default_rng(0)
    rows = []
    losses = {e: {1: 5.00, 8: 4.90, 32: 4.80}.get(e, 5.0 - 0.04 * math.log2(e)) for e in p.variants}
    for s in p.seeds:
        for e, loss in losses.items():
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
            default = {e: 0.40 + 0.15 * (e == 8) + 0.2 * (e == 32) for e in p.variants}
            models = [("none", e, e, {**default, **(scratch_acc or {})}[e]) for e in p.variants]
            acc = {"uncurl": uncurl_acc, "freq_prune": 0.50, "freq_merge": 0.55, "mcsmoe": 0.655, "hybrid": 0.66}
            models += [
                (m, 32, d, (uncurl_by_d or {}).get(d, a) if m == "uncurl" else a)
                for m, a in acc.items()
                for d in p.targets
            ]
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


# -- claim (d) at every factor, the readouts without finetuning, router health, what changed -----------------------
READOUT_DELTA = {"uncurl": 0.02, "freq_prune": 0.08, "freq_merge": 0.05, "mcsmoe": 0.06, "hybrid": 0.03}


def _fill_readouts_and_health(store: ResultsStore, p):
    """Readout rows as `readout_study` writes them (base LM loss 4.0 + 0.01 * seed; a reduction to D adds
    READOUT_DELTA[method] * log2(32 / D); the scratch D model 0.01 * log2(32 / D)); per-layer reconstruction (mapped
    0.1 * layer + READOUT_DELTA, routed twice that); router health of each SMoE (entropy / ln E 0.2 and 0.3 in its two
    MoE layers; 2e seed 1 ends at 0.85 in layer 1: the only model that gets the warning)."""
    rows = []
    for s in p.seeds:
        for domain in p.readout_domains:
            task = f"corpus:val_{domain}"
            ident = dict(base_model="tiny", task=task, stage="zeroshot", seed=s)
            for e in p.variants:
                v = 4.0 + 0.01 * s + 0.01 * math.log2(32 / e)
                rows.append({**ident, "method": "none", "z": e, "d": e, "metric": "lm_loss", "value": v})
            for m, delta in READOUT_DELTA.items():
                for d in p.targets:
                    v = 4.0 + 0.01 * s + delta * math.log2(32 / d)
                    mapped = [round(delta + 0.1 * layer, 6) for layer in range(2)]
                    routed = [2 * x for x in mapped]
                    extra = {"recon_mapped_layers": mapped, "recon_routed_layers": routed}
                    red = {**ident, "method": m, "z": 32, "d": d, "extra": extra}
                    rows.append({**red, "metric": "lm_loss", "value": v})
                    rows.append({**red, "metric": "recon_mapped", "value": sum(mapped) / 2})
                    rows.append({**red, "metric": "recon_routed", "value": sum(routed) / 2})
        for e in [v for v in p.variants if v > 1]:
            ident = dict(base_model="tiny", method="none", z=e, d=e, task=R.PRETRAIN_TASK, stage="router", seed=s)
            for layer, ent in enumerate((0.2, 0.85 if (e, s) == (2, 1) else 0.3)):
                values = {"entropy_ratio": ent, "top1_gate": 1 - ent, "max_share": 0.5, "min_share": 0.0}
                values["drop_frac"] = 0.1
                for f, v in values.items():
                    rows.append({**ident, "metric": f"{f}:L{layer}", "value": v, "extra": {"layer": layer}})
    store.append_many(rows)


def _factor_params(tmp_path, **kw):
    base = dict(variants=[1, 2, 4, 8, 16, 32], tasks=["cloze-news"], readout_domains=["news"])
    base["router_recipe"] = {"router_lr_mult": 20.0, "router_weight_decay": 0.0}
    return _params(tmp_path, **{**base, **kw})


def test_claim_d_tests_every_factor_with_a_scratch_model(tmp_path):
    p = _factor_params(tmp_path)
    assert [(t["d"], t["factor"], t["side"], t["tested"]) for t in R.threshold_factors(p)] == [
        (16, 2.0, "keeps", True),
        (8, 4.0, "keeps", True),
        (4, 8.0, "loses", True),
        (2, 16.0, "loses", True),
    ]
    # the paper's threshold planted: UNCURL 5 points above scratch at 2x and 4x, 5 points below at 8x and 16x
    scratch = {1: 0.40, 2: 0.50, 4: 0.50, 8: 0.50, 16: 0.50, 32: 0.60}
    uncurl = {16: 0.55, 8: 0.55, 4: 0.45, 2: 0.45}
    store = R.load_store(p)
    _fill_store(store, p, scratch_acc=scratch, uncurl_by_d=uncurl)
    d = {c.key: c for c in R.evaluate_claims(store.rows(), p)}["d"]
    assert [x.name.split(" ")[0] for x in d.parts] == ["2x", "4x", "8x", "16x"]
    assert [x.est.mean for x in d.parts] == pytest.approx([5.0, 5.0, 5.0, 5.0], abs=2.0)
    assert all(x.verdict == R.SUPPORTED for x in d.parts) and d.verdict == R.SUPPORTED and not d.note
    assert "scratch vs uncurl" in d.parts[2].name and "uncurl vs scratch" in d.parts[0].name
    # beyond the threshold at 2x already (the 128e pattern): the 2x part fails, so the claim is not supported
    p2 = _factor_params(tmp_path / "flip")
    store2 = R.load_store(p2)
    _fill_store(store2, p2, scratch_acc=scratch, uncurl_by_d={**uncurl, 16: 0.45})
    d2 = {c.key: c for c in R.evaluate_claims(store2.rows(), p2)}["d"]
    assert d2.parts[0].verdict == R.NOT_SUPPORTED and d2.verdict == R.NOT_SUPPORTED
    assert [x.verdict for x in d2.parts[1:]] == [R.SUPPORTED] * 3
    # without 16e and 2e scratch models only 4x and 8x are tested and the others are named
    p3 = _params(tmp_path / "old", variants=[1, 4, 8, 32], tasks=["cloze-news"])
    store3 = R.load_store(p3)
    _fill_store(store3, p3, scratch_acc=scratch, uncurl_by_d=uncurl)
    d3 = {c.key: c for c in R.evaluate_claims(store3.rows(), p3)}["d"]
    assert [x.name.split(" ")[0] for x in d3.parts] == ["4x", "8x"] and d3.verdict == R.SUPPORTED
    assert "D=16 (2x, should keep)" in d3.note and "D=2 (16x, should lose)" in d3.note


def test_readouts_router_health_and_what_changed_in_the_report(tmp_path):
    p = _factor_params(tmp_path)
    store = R.load_store(p)
    _fill_store(store, p)
    _fill_readouts_and_health(store, p)
    df = store.rows()
    claims = {c.key: c for c in R.evaluate_claims(df, p)}
    # the zero-shot readout: uncurl's loss is the lowest of the reductions at every D, so (c)'s readout is supported
    ro = {x.name: x for x in claims["c"].readout}
    assert set(ro) == {"uncurl vs freq_prune", "uncurl vs freq_merge", "uncurl vs mcsmoe"}
    # pooled over D = 16, 8, 4, 2 (log2 32/D = 1, 2, 3, 4: mean 2.5): (0.08 - 0.02) * 2.5 = 0.15 nats
    assert ro["uncurl vs freq_prune"].est.mean == pytest.approx(0.15) and claims["c"].readout_verdict == R.SUPPORTED
    assert claims["e"].readout[0].est.mean == pytest.approx(-0.025) and claims["e"].readout_verdict == R.NOT_SUPPORTED
    # (d): uncurl 32e->16e costs 0.02 nats, the scratch 16e model 0.01: scratch lower, against "keeps" at 2x
    d_ro = {x.name.split(" ")[0]: x for x in claims["d"].readout}
    assert d_ro["2x"].est.mean == pytest.approx(-0.01) and d_ro["16x"].est.mean == pytest.approx(0.04)
    assert claims["d"].readout_verdict == R.NOT_SUPPORTED
    assert claims["b"].readout[0].est.mean == pytest.approx(0.07 * 2.5)

    t = R.readout_loss_table(df, p).set_index(["domain", "D"])
    assert t.loc[("news", 8), "uncurl"] == "+0.040 ± 0.000" and t.loc[("news", 2), "freq_prune"] == "+0.320 ± 0.000"
    assert t.loc[("news", 8), "scratch D"] == "+0.020 ± 0.000" and t.loc[("news", 1), "scratch D"] == "+0.050 ± 0.000"
    assert t.loc[("news", 8), "32e (unreduced) LM loss"] == "4.010 ± 0.010"
    rec = R.readout_recon_table(df, p, "mapped").set_index(["domain", "D", "layer"])
    assert rec.loc[("news", 4, 1), "mcsmoe"] == "0.160 ± 0.000" and len(rec) == 4 * 2
    assert R.readout_recon_table(df, p, "routed").set_index(["domain", "D", "layer"]).loc[("news", 4, 1), "mcsmoe"] == (
        "0.320 ± 0.000"
    )

    health = R.router_health_table(df, p).set_index(["model", "seed"])
    assert len(health) == 5 * 3 and health.loc[("32e", 0), "entropy / ln E (per layer)"] == "0.200 / 0.300"
    assert health.loc[("2e", 1), "specialised"] == "**no**" and health.loc[("2e", 0), "specialised"] == "yes"
    warnings = R.router_warnings(df)
    assert len(warnings) == 1 and warnings[0].startswith("2e seed 1: routers did not specialise")
    assert "MoE layer 1: 0.85" in warnings[0]

    comp = R.completeness(df, p)
    assert comp["readouts"] == (3 * (6 + 5 * 4), 3 * (6 + 5 * 4)) and comp["complete"]

    out = R.write_report(p)
    text = (tmp_path / "replication" / "replication.md").read_text()
    assert "## Router health of every model" in text and "**Warning.** 2e seed 1: routers did not specialise" in text
    assert "## Readouts without finetuning" in text and "| news     |  16 |" in text
    assert "Per factor (oriented differences" in text and "| 16x " in text
    # one "what changed" paragraph per claim, the first study's verdict a constant, this run's computed
    assert text.count("**What changed against the first study.**") == 5
    assert "First study (docs/replication.md at 681dfeb" in text
    c_par = next(x for x in text.split("\n\n") if "**inconclusive** (uncurl vs freq_prune -0.11 ± 0.23" in x)
    assert "This run: **supported** (uncurl vs freq_prune: +15.6" in c_par  # 66 vs 50 points, computed
    assert "the verdict is changed from **inconclusive** to **supported**" in c_par
    a_par = next(x for x in text.split("\n\n") if x.startswith("**What changed") and "4e vs dense -0.21" in x)
    assert "the verdict is unchanged" in a_par and "MoE - dense now 2e +0.0" in a_par and "32e -0.15" in a_par
    assert "factors tested 2x, 4x, 8x, 16x (first: 4x, 8x)" in text
    assert "32e routers end at 0.300 ± 0.000 ln E in their worst layer (first: ~0.98)" in text
    assert "Router recipe (every variant): router_lr_mult 20, router_weight_decay 0" in text
    pngs = {x.rsplit("/", 1)[-1] for x in out["figures"]}
    assert {"router_health.png", "readout_lm_loss_news.png", "readout_reconstruction_news.png"} <= pngs
    # the verdict table's readout column
    row = next(line for line in text.splitlines() if line.startswith("| (c) UNCURL"))
    assert row.count("supported") >= 2 and "| supported " in row


def test_partial_report_counts_missing_readouts(tmp_path):
    p = _factor_params(tmp_path)
    store = R.load_store(p)
    _fill_store(store, p)
    comp = R.completeness(store.rows(), p)
    assert comp["readouts"] == (0, 3 * 26) and not comp["complete"]
    assert "readout news seed 0 32e" in comp["missing"] and "readout news seed 2 hybrid 32e->2e" in comp["missing"]
    text = R.render_report(store.rows(), p)
    assert "0/78 readouts without finetuning" in text and "## Readouts without finetuning" not in text


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
