"""Figures that carry their uncertainty: Wilson intervals, seeds, majority and chance lines, one-class flags."""

import math

import numpy as np
import pandas as pd
import pytest

from smoe_lab import plots
from smoe_lab.evaluate import top_prediction_share, wilson_interval


def test_wilson_interval_values():
    # textbook values: 50/100 -> [0.4038, 0.5962]; 0/10 -> [0, 0.2775] (z = 1.96)
    assert wilson_interval(0.5, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 3.8416 / 13.8416), abs=1e-9)
    assert wilson_interval(1.0, 10) == pytest.approx((10 / 13.8416, 1.0), abs=1e-9)
    lo, hi = wilson_interval(0.637, 256)
    assert lo < 0.637 < hi and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.637 * 0.363 / 256), rel=0.02)
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(0.5, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        wilson_interval(1.5, 10)


def test_top_prediction_share():
    assert top_prediction_share([1, 1, 1, 1]) == 1.0
    assert top_prediction_share([0, 1, 1, 0, 1]) == 0.6


def test_interval_over_seeds_and_single_runs():
    y, lo, hi = plots.interval([0.6], 100, proportion=True)
    assert (y - lo, y + hi) == pytest.approx(wilson_interval(0.6, 100))
    y, lo, hi = plots.interval([0.6, 0.7], 100, proportion=True)  # two seeds: t interval of the mean, df = 1
    assert y == pytest.approx(0.65) and lo == hi == pytest.approx(
        12.706 * np.std([0.6, 0.7], ddof=1) / np.sqrt(2), rel=1e-3
    )
    assert plots.interval([3.2], None, proportion=False) == (3.2, 0.0, 0.0)


def _rows():
    r = []
    for method, accs in {"uncurl": [0.60, 0.62], "freq_prune": [0.637, 0.55]}.items():
        for d, acc in zip([2, 4], accs):
            r.append({"task": "boolq", "method": method, "z": 8, "d": d, "accuracy": acc, "n_eval": 256,
                      "top_pred_share": 1.0 if acc == 0.637 else 0.7})  # fmt: skip
    r.append(
        {"task": "boolq", "method": "none", "z": 8, "d": 8, "accuracy": 0.633, "n_eval": 256, "top_pred_share": 0.8}
    )
    r.append(
        {"task": "boolq", "method": "none", "z": 4, "d": 4, "accuracy": 0.58, "n_eval": 256, "top_pred_share": 0.8}
    )
    return pd.DataFrame(r)


def test_accuracy_figure_has_floors_n_intervals_stagger_and_one_class_flag():
    fig = plots.accuracy_vs_experts(_rows(), "boolq", chance=0.5, majority=0.637)
    assert "n=256" in fig.layout.title.text
    notes = [a.text for a in fig.layout.annotations]
    assert any(t.startswith("majority class 0.637") for t in notes) and any(t.startswith("chance") for t in notes)
    points = [t for t in fig.data if t.name in ("uncurl", "freq_prune", "trained from scratch", "unreduced 8e")]
    assert len(points) == 4
    for t in points:  # every point has an interval: Wilson on 256 examples
        for y, lo, hi in zip(t.y, t.error_y.arrayminus, t.error_y.array):
            assert (y - lo, y + hi) == pytest.approx(wilson_interval(y, 256))
    xs = [x for t in points for x in t.x]
    assert len(set(np.round(xs, 6))) == len(xs)  # points that share a D stand side by side
    flag = [t for t in fig.data if t.name.startswith("same answer for")]
    assert len(flag) == 1 and list(flag[0].text) == ["freq_prune, D=2"]


def test_rows_without_n_use_the_given_n():
    rows = _rows().drop(columns=["n_eval", "top_pred_share"])
    fig = plots.accuracy_vs_experts(rows, "boolq", n=100)
    t = next(t for t in fig.data if t.name == "uncurl")
    assert (t.y[0] - t.error_y.arrayminus[0], t.y[0] + t.error_y.array[0]) == pytest.approx(wilson_interval(0.6, 100))
    assert "n=100" in fig.layout.title.text
    assert not [t for t in fig.data if t.name.startswith("same answer for")]
