"""Results store (SQLite) and the paper's accuracy tables (Tables 1-4).

One append-only table holds every number a run produces, one row per (model, task, stage, seed, metric):

    results(id, created, base_model, method, z, d, task, stage, seed, metric, value, config_hash, seconds, extra_json)

base_model names the backbone ("354M", "tiny"); z is the expert count the model was pretrained with, d the count it
has now (z == d: trained from scratch, method "none"; z > d: reduced by `method`, e.g. "uncurl", "freq-prune").
Queries are parameterised; column names in filters are checked against the schema. WAL mode and a busy timeout let
several processes append at once; triggers refuse UPDATE and DELETE. Nothing is unpickled: extras are JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

SCRATCH = "none"  # method of a model trained from scratch (z == d)
COLUMNS = (
    "id",
    "created",
    "base_model",
    "method",
    "z",
    "d",
    "task",
    "stage",
    "seed",
    "metric",
    "value",
    "config_hash",
    "seconds",
    "extra_json",
)
REQUIRED = ("base_model", "method", "z", "d", "task", "metric", "value")
SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    created TEXT NOT NULL,
    base_model TEXT NOT NULL,
    method TEXT NOT NULL,
    z INTEGER NOT NULL,
    d INTEGER NOT NULL,
    task TEXT NOT NULL,
    stage TEXT NOT NULL,
    seed INTEGER NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    config_hash TEXT,
    seconds REAL,
    extra_json TEXT
);
CREATE INDEX IF NOT EXISTS results_lookup ON results (task, metric, base_model, d);
CREATE TRIGGER IF NOT EXISTS results_no_update BEFORE UPDATE ON results
    BEGIN SELECT RAISE(ABORT, 'results are append-only'); END;
CREATE TRIGGER IF NOT EXISTS results_no_delete BEFORE DELETE ON results
    BEGIN SELECT RAISE(ABORT, 'results are append-only'); END;
"""
TASK_TITLES = {"rte": "RTE", "boolq": "BoolQ", "copa": "COPA", "cb": "CB", "record": "ReCoRD", "wsc": "WSC"}


def config_hash(obj: Any) -> str:
    """First 16 hex digits of the sha256 of `obj` as sorted JSON: identifies the settings a number came from."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _int(row: dict, name: str, minimum: int) -> int:
    v = row[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"results row: {name} must be an integer >= {minimum}, got {v!r}")
    return v


def normalize_row(row: dict[str, Any]) -> tuple:
    """Validate one row for `append` and return its values in COLUMNS order (without id)."""
    allowed = set(COLUMNS[1:]) - {"extra_json"} | {"extra"}
    unknown = sorted(set(row) - allowed)
    if unknown:
        raise ValueError(f"results row: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    missing = [k for k in REQUIRED if row.get(k) is None]
    if missing:
        raise ValueError(f"results row: missing field(s) {missing}")
    z, d = _int(row, "z", 1), _int(row, "d", 1)
    if d > z:
        raise ValueError(f"results row: d={d} experts cannot exceed z={z} (the pretrained count)")
    value = row["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"results row: value must be a finite number, got {value!r}")
    row = {"stage": "stage2", "seed": 0, **row}
    _int(row, "seed", 0)
    created = row.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    extra = json.dumps(row.get("extra") or {}, sort_keys=True, default=str)
    seconds = row.get("seconds")
    return (
        created,
        str(row["base_model"]),
        str(row["method"]),
        z,
        d,
        str(row["task"]),
        str(row["stage"]),
        row["seed"],
        str(row["metric"]),
        float(value),
        None if row.get("config_hash") is None else str(row["config_hash"]),
        None if seconds is None else float(seconds),
        extra,
    )


class ResultsStore:
    """An SQLite file of results. Safe for concurrent appends from several processes (WAL + busy timeout);
    each call opens and closes its own connection, so a store object may be shared across forks."""

    def __init__(self, path: str | Path, timeout: float = 60.0):
        self.path = Path(path)
        self.timeout = timeout
        if self.path.is_dir():
            raise ValueError(f"results store {self.path} is a folder: give a .sqlite file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as con:
                con.execute("PRAGMA journal_mode=WAL")
                with con:
                    con.executescript(SCHEMA)
                cols = [r[1] for r in con.execute("PRAGMA table_info(results)")]
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not a smoe_lab results store (SQLite): {e}") from None
        if tuple(cols) != COLUMNS:
            raise ValueError(f"{self.path} has a 'results' table with other columns {cols}: not a smoe_lab store")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=self.timeout)
        con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return con

    def append(self, **row: Any) -> int:
        """Append one row (fields as in COLUMNS; `extra` a JSON-able dict); returns its id."""
        return self.append_many([row])[0]

    def append_many(self, rows: Iterable[dict[str, Any]]) -> list[int]:
        """Append several rows in one transaction (all or none); returns their ids."""
        values = [normalize_row(r) for r in rows]
        sql = f"INSERT INTO results ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * (len(COLUMNS) - 1))})"
        ids = []
        with closing(self._connect()) as con:
            with con:
                for v in values:
                    ids.append(con.execute(sql, v).lastrowid)
        return ids

    def rows(self, **filters: Any) -> pd.DataFrame:
        """All rows matching column == value (or column IN list) filters, in insertion order, as a DataFrame."""
        where, params = [], []
        for col, want in filters.items():
            if col not in COLUMNS:
                raise ValueError(f"unknown results column {col!r}; known: {', '.join(COLUMNS)}")
            if isinstance(want, (list, tuple, set, frozenset)):
                want = list(want)
                if not want:
                    where.append("0")
                    continue
                where.append(f"{col} IN ({', '.join('?' * len(want))})")
                params.extend(want)
            else:
                where.append(f"{col} = ?")
                params.append(want)
        sql = "SELECT * FROM results" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id"
        with closing(self._connect()) as con:
            return pd.read_sql_query(sql, con, params=params)

    def __len__(self) -> int:
        with closing(self._connect()) as con:
            return int(con.execute("SELECT COUNT(*) FROM results").fetchone()[0])


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


def model_label(base_model: str, z: int, d: int) -> str:
    """The paper's names: "354M" (dense), "354M+8e" (from scratch), "354M+(32e->8e)" (reduced from 32 to 8)."""
    if z == d:
        return base_model if d == 1 else f"{base_model}+{d}e"
    return f"{base_model}+({z}e->{d}e)"


def _order_key(base: str, method: str, z: int, d: int) -> tuple:
    # Paper order: each scratch model, then the models reduced from it (by target size, then method).
    return (base, z, 0, 0, "") if z == d else (base, z, 1, d, method)


@dataclass
class AccuracyTable:
    """Per model (rows) and task (columns): mean and std over seeds, seed count, (+)/(-) mark, best flag.

    `models` has one row per table row: label, method, base_model, z, d (same index as the other frames).
    """

    models: pd.DataFrame
    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    marks: pd.DataFrame
    best: pd.DataFrame

    def cell(self, row: int, task: str, decimals: int = 2, bold: bool = False) -> str:
        m = self.mean.at[row, task]
        if pd.isna(m):
            return ""
        text = f"{m:.{decimals}f}"
        if self.n.at[row, task] > 1:
            text += f" ± {self.std.at[row, task]:.{decimals}f}"
        if bold and self.best.at[row, task]:
            text = f"**{text}**"
        mark = self.marks.at[row, task]
        return f"{text} ({mark})" if mark else text

    def to_frame(self, decimals: int = 2, bold: bool = False) -> pd.DataFrame:
        """Formatted strings: Model, Method, then one column per task ("66.48 ± 0.30 (+)")."""
        out = pd.DataFrame(
            {
                "Model": self.models["label"],
                "Method": [
                    "scratch" if z == d else m for m, z, d in self.models[["method", "z", "d"]].itertuples(False)
                ],
            }
        )
        for task in self.mean.columns:
            out[TASK_TITLES.get(task, task)] = [self.cell(i, task, decimals, bold) for i in self.mean.index]
        return out

    def to_markdown(self, decimals: int = 2) -> str:
        """Markdown table; the best value of each column in **bold**, as in the paper."""
        return self.to_frame(decimals, bold=True).to_markdown(index=False)


def _latest_per_seed(df: pd.DataFrame) -> pd.DataFrame:
    # A rerun of the same (model, task, stage, seed, metric) supersedes the earlier row (the store is append-only).
    keys = ["base_model", "method", "z", "d", "task", "stage", "seed", "metric"]
    return df.sort_values("id").groupby(keys, as_index=False).tail(1)


def accuracy_table(
    store: ResultsStore | pd.DataFrame,
    tasks: Sequence[str],
    base_model: str | Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    stage: str | None = "stage2",
    metric: str = "accuracy",
    percent: bool = True,
) -> AccuracyTable:
    """The paper's Table 1/2 layout from stored results: one row per model, one column per task.

    Rows: every (base_model, method, z, d) with results for `metric` (and `stage`, unless None) on any of `tasks`;
    `methods` keeps only those reduction methods (models from scratch are always kept: they are the reference).
    Labels follow `model_label`; order is each scratch model followed by the models reduced from it.
    Cells: mean over seeds (x100 when percent), std when there is more than one seed; when a seed was evaluated
    several times only its latest row counts.
    Marks: a reduced model (z > d) gets "+" on a task when its mean is STRICTLY greater than the mean of the model
    trained from scratch with the same base_model and the same d ("354M+(32e->8e)" vs "354M+8e"), otherwise "-";
    no mark when that scratch model has no result for the task. Best: in each task column, every row whose mean
    equals the column's maximum.
    """
    df = store.rows() if isinstance(store, ResultsStore) else store.copy()
    df = df[df["metric"].eq(metric) & df["task"].isin(list(tasks))]
    if stage is not None:
        df = df[df["stage"].eq(stage)]
    if base_model is not None:
        df = df[df["base_model"].isin([base_model] if isinstance(base_model, str) else list(base_model))]
    if methods is not None:
        df = df[df["z"].eq(df["d"]) | df["method"].isin(list(methods))]
    if df.empty:
        raise ValueError(f"no {metric!r} results for tasks {list(tasks)} (stage {stage!r}) in the store")
    df = _latest_per_seed(df)
    scale = 100.0 if percent else 1.0
    keys = ["base_model", "method", "z", "d"]
    stats = (
        df.assign(value=df["value"] * scale)
        .groupby(keys + ["task"])["value"]
        .agg(["mean", "std", "count"])
        .reset_index()
    )
    models = sorted(
        {tuple(r) for r in stats[keys].itertuples(index=False)}, key=lambda m: _order_key(m[0], m[1], m[2], m[3])
    )
    models_df = pd.DataFrame(models, columns=keys)
    models_df.insert(0, "label", [model_label(b, z, d) for b, _, z, d in models])
    pos = {m: i for i, m in enumerate(models)}
    shape = pd.DataFrame(index=range(len(models)), columns=list(tasks))
    mean, std, n = shape.astype(float), shape.astype(float), shape.fillna(0).astype(int)
    for r in stats.itertuples(index=False):
        i = pos[(r.base_model, r.method, r.z, r.d)]
        mean.at[i, r.task], std.at[i, r.task], n.at[i, r.task] = r.mean, r.std, r.count
    marks = pd.DataFrame("", index=mean.index, columns=mean.columns)
    scratch = {}
    for (b, _, z, d), i in pos.items():
        if z == d:
            scratch.setdefault((b, d), i)
    for (b, _, z, d), i in pos.items():
        ref = scratch.get((b, d))
        if z == d or ref is None:
            continue
        for task in tasks:
            mine, theirs = mean.at[i, task], mean.at[ref, task]
            if not (pd.isna(mine) or pd.isna(theirs)):
                marks.at[i, task] = "+" if mine > theirs else "-"
    best = mean.eq(mean.max(axis=0)) & mean.notna()
    return AccuracyTable(models_df, mean, std, n, marks, best)


def checkpoint_identity(model_config, meta: dict[str, Any], base_model: str | None = None) -> dict[str, Any]:
    """base_model, method, z, d of a checkpoint as the store wants them.

    d: the expert count per MoE layer (the rounded mean for per-layer counts; 1 for a dense model); z: the count it
    was pretrained with (the length of config.expert_map's rows for a reduced model, else d); method: meta
    "method", else the reduction report's method, else "none" for a model never reduced; base_model: the argument,
    else meta "base_model", else "model".
    """
    counts = model_config.experts_per_layer or [1]
    d = round(sum(counts) / len(counts))
    z = max(len(m) for m in model_config.expert_map) if model_config.expert_map else d
    method = meta.get("method") or (meta.get("reduction") or {}).get("method")
    if not method:
        if z != d:
            raise ValueError(f"checkpoint reduced from {z} to {d} experts names no method: pass it explicitly")
        method = SCRATCH
    return {"base_model": base_model or meta.get("base_model") or "model", "method": str(method), "z": z, "d": d}
