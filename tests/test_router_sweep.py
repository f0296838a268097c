import pandas as pd
import pytest

from smoe_lab.router_sweep import COLUMNS, append_row, done_keys, summarize, unspecialised


def _row(recipe, experts, seed, val, ratios=(0.9, 0.9)):
    r = {c: 0.0 for c in COLUMNS}
    r.update(budget="quick", recipe=recipe, recipe_json="{}", experts=experts, seed=seed, val_loss=val)
    r.update(entropy_ratio_max=max(ratios), entropy_ratio_layers=" ".join(f"{x:.3f}" for x in ratios))
    return r


def test_summary_pairs_by_seed_and_csv_rows_resume(tmp_path):
    csv = tmp_path / "sweep.csv"
    rows = [_row("paper", 8, s, v) for s, v in ((0, 6.3), (1, 6.5))]
    rows += [_row("fast", 8, s, v, (0.2, 0.4)) for s, v in ((0, 6.2), (1, 6.3))] + [_row("paper", 1, 0, 6.0)]
    for r in rows:
        append_row(csv, r)
    assert done_keys(csv) == {("quick", r["recipe"], r["experts"], r["seed"]) for r in rows}
    s = summarize(pd.read_csv(csv)).set_index(["recipe", "experts"])
    fast = s.loc[("fast", 8)]
    # paired: (6.2 - 6.3, 6.3 - 6.5) = (-0.1, -0.2): mean -0.15, sd 0.071
    assert fast["vs paper"] == "-0.150 ± 0.071" and fast["seeds"] == "0 1" and fast["<= 0.5 ln E"] == "yes"
    assert s.loc[("paper", 8)]["<= 0.5 ln E"] == "no" and s.loc[("paper", 8)]["vs paper"] == ""
    assert fast["vs dense"] == "0.200" and s.loc[("paper", 1)]["entropy/lnE (worst layer)"] == ""
    warned = unspecialised(pd.read_csv(csv))
    assert len(warned) == 2 and all(w.startswith("quick/paper/8e") for w in warned)
    assert pytest.approx(float(fast["val_loss"].split(" ")[0])) == 6.25
