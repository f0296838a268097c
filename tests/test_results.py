import multiprocessing as mp
import sqlite3

import pytest

from smoe_lab.results import ResultsStore, accuracy_table, config_hash, model_label


def _writer(path: str, worker: int, n: int) -> None:
    store = ResultsStore(path, timeout=30)
    for i in range(n):
        store.append(base_model="tiny", method="none", z=8, d=8, task="rte", seed=worker, metric="step", value=i)


def test_two_processes_append_concurrently(tmp_path):
    path = str(tmp_path / "runs" / "results.sqlite")
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 60)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    df = ResultsStore(path).rows()
    assert len(df) == 120 and df["id"].is_unique
    for w in (1, 2):
        assert sorted(df[df["seed"] == w]["value"]) == list(range(60))  # nothing lost, nothing doubled
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_append_only_validated_and_parameterised(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    row = dict(base_model="354M", method="uncurl", z=32, d=8, task="rte", metric="accuracy", value=0.66)
    rid = store.append(**row, seconds=1.5, config_hash=config_hash({"lr": 1e-6}), extra={"note": "x"})
    assert rid == 1 and len(store) == 1
    got = store.rows(task="rte").iloc[0]
    assert (got["stage"], got["seed"], got["extra_json"], len(got["config_hash"])) == ("stage2", 0, '{"note": "x"}', 16)
    for bad, msg in [
        ({**row, "d": 64}, "cannot exceed"),
        ({**row, "value": float("nan")}, "finite"),
        ({**row, "colour": "red"}, "unknown field"),
        ({k: v for k, v in row.items() if k != "task"}, "missing"),
    ]:
        with pytest.raises(ValueError, match=msg):
            store.append(**bad)
    with pytest.raises(ValueError, match="unknown results column"):
        store.rows(**{"task = 'rte' OR 1=1 --": "x"})
    assert store.rows(task="rte' OR '1'='1").empty  # values are parameters, never SQL
    assert len(store.rows(method=["uncurl", "none"])) == 1 and store.rows(method=[]).empty
    with sqlite3.connect(store.path) as con, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE results SET value = 1.0")
    with sqlite3.connect(store.path) as con, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM results")
    assert len(store) == 1


def _hand_made_store(path):
    s = ResultsStore(path)
    add = lambda method, z, d, task, value, seed=0: s.append(  # noqa: E731
        base_model="354M", method=method, z=z, d=d, task=task, metric="accuracy", value=value, seed=seed
    )
    add("none", 8, 8, "rte", 0.6600, seed=0)
    add("none", 8, 8, "rte", 0.6606, seed=1)
    add("none", 8, 8, "boolq", 0.6735)
    add("none", 32, 32, "rte", 0.6686)
    add("none", 32, 32, "boolq", 0.6827)
    add("uncurl", 32, 8, "rte", 0.6648)  # beats 354M+8e on RTE -> (+)
    add("uncurl", 32, 8, "boolq", 0.6735)  # ties 354M+8e on BoolQ -> (-) (strictly greater needed)
    add("freq-prune", 32, 8, "rte", 0.50)
    add("freq-prune", 32, 8, "rte", 0.6486)  # the same seed again: the later row supersedes the first
    add("none", 64, 64, "rte", 0.6764)
    add("uncurl", 64, 32, "rte", 0.6714)  # vs 354M+32e: (+)
    add("uncurl", 64, 32, "boolq", 0.7000)  # best BoolQ overall -> bold
    add("none", 1, 1, "rte", 0.6421)
    s.append(base_model="354M", method="none", z=8, d=8, task="rte", metric="loss", value=2.0)  # other metric
    s.append(base_model="354M", method="none", z=8, d=8, task="rte", metric="accuracy", value=0.9, stage="stage1")
    return s


def test_accuracy_table_marks_and_bold(tmp_path):
    t = accuracy_table(_hand_made_store(tmp_path / "r.sqlite"), ["rte", "boolq"])
    labels = list(t.models["label"] + " " + t.models["method"])
    assert labels == [
        "354M none",
        "354M+8e none",
        "354M+32e none",
        "354M+(32e->8e) freq-prune",
        "354M+(32e->8e) uncurl",
        "354M+64e none",
        "354M+(64e->32e) uncurl",
    ]
    row = {lab: i for i, lab in enumerate(labels)}
    r8, un8, fp8, un32 = (row[k] for k in labels[1:2] + labels[4:5] + labels[3:4] + labels[6:7])
    assert t.mean.at[r8, "rte"] == pytest.approx(66.03) and t.n.at[r8, "rte"] == 2
    assert t.std.at[r8, "rte"] == pytest.approx(0.0424264, abs=1e-6)
    assert t.mean.at[fp8, "rte"] == pytest.approx(64.86) and t.n.at[fp8, "rte"] == 1  # latest row of seed 0
    assert (t.marks.at[un8, "rte"], t.marks.at[un8, "boolq"]) == ("+", "-")
    assert t.marks.at[fp8, "rte"] == "-" and t.marks.at[fp8, "boolq"] == ""  # no result, no mark
    assert t.marks.at[un32, "rte"] == "+" and t.marks.at[r8, "rte"] == ""  # scratch models carry no mark
    assert t.best["rte"].tolist() == [i == row["354M+64e none"] for i in range(7)]
    assert t.best.at[un32, "boolq"] and t.best["boolq"].sum() == 1
    md = t.to_markdown()
    assert "| Model " in md and "RTE" in md and "BoolQ" in md
    assert "**67.64**" in md and "**70.00** (+)" in md and "66.48 (+)" in md and "67.35 (-)" in md
    assert "66.03 ± 0.04" in md and "scratch" in md
    frame = t.to_frame()
    assert list(frame.columns) == ["Model", "Method", "RTE", "BoolQ"] and "**" not in frame.to_string()
    only = accuracy_table(_hand_made_store(tmp_path / "r2.sqlite"), ["rte"], methods=["uncurl"])
    assert "freq-prune" not in set(only.models["method"]) and "none" in set(only.models["method"])
    s1 = accuracy_table(_hand_made_store(tmp_path / "r3.sqlite"), ["rte"], stage="stage1")
    assert s1.mean.iloc[0, 0] == pytest.approx(90.0)
    with pytest.raises(ValueError, match="no 'accuracy' results"):
        accuracy_table(ResultsStore(tmp_path / "empty.sqlite"), ["rte"])


def test_model_labels():
    assert model_label("354M", 1, 1) == "354M"
    assert model_label("354M", 8, 8) == "354M+8e"
    assert model_label("354M", 128, 64) == "354M+(128e->64e)"
