"""The report's tables, computed from the results store's rows (a DataFrame of ResultsStore.rows())."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .. import experiments
from ..results import accuracy_table
from .stats import Estimate, verdict
from .study import PRETRAIN_TASK, RUN_TASK, label, latest, latest_curve, pretrain_frame, protocols, task_frame


def budget_table(df: pd.DataFrame, p) -> pd.DataFrame:
    """(base - dense) validation loss per training budget: the main run's budget (every seed) and each ablation
    budget (its seeds), for the paper's protocol and without drops; plus the paired change from the main budget."""
    base = max(p.variants)
    pre = pretrain_frame(df)
    bud = latest(df[(df["task"] == PRETRAIN_TASK) & (df["stage"] == "budget")])
    rows = []
    for proto in protocols(p)[:2]:
        main = pre[pre["metric"] == f"val_loss:{proto.name}"].pivot_table(index="seed", columns="d", values="value")
        if 1 not in main.columns or base not in main.columns:
            continue
        gap_main = (main[base] - main[1]).dropna()
        budgets = [(p.tokens, gap_main)]
        for tokens in sorted(p.ablation_tokens):
            m = bud[bud["metric"] == f"val_loss:{proto.name}@{tokens}"]
            m = m.pivot_table(index="seed", columns="d", values="value")
            if 1 in m.columns and base in m.columns:
                budgets.append((tokens, (m[base] - m[1]).dropna()))
        for tokens, gap in budgets:
            v, _ = verdict(-gap.values, p.se_factor)
            est = Estimate.of(gap.values)
            change = (gap - gap_main.reindex(gap.index)).dropna()
            ch = Estimate.of(change.values) if tokens != p.tokens else None
            closes = verdict(-change.values, p.se_factor)[0] if ch else ""
            rows.append(
                {
                    "protocol": proto.name,
                    "tokens per model": tokens,
                    "seeds": ",".join(str(s) for s in gap.index),
                    f"{label(base)} - dense (nats)": est.text(3),
                    f"change vs {p.tokens:,} tokens, same seeds": ch.text(3) if ch else "",
                    "MoE lower (verdict)": v,
                    "more tokens close the gap (verdict)": closes,
                }
            )
    return pd.DataFrame(rows)


def protocol_gaps(pre: pd.DataFrame, p) -> pd.DataFrame:
    """Per protocol and MoE variant: (MoE - dense) validation loss mean ± sd over seeds, and the MoE drop share."""
    rows = []
    for proto in protocols(p):
        m = pre[pre["metric"] == f"val_loss:{proto.name}"].pivot_table(index="seed", columns="d", values="value")
        dr = pre[pre["metric"] == f"drop_frac:{proto.name}"].pivot_table(index="seed", columns="d", values="value")
        if 1 not in m.columns:
            continue
        for e in [c for c in m.columns if c != 1]:
            v, est = verdict((m[1] - m[e]).dropna().values, p.se_factor)
            rows.append(
                {
                    "protocol": proto.name,
                    "capacity factor": "no drops" if not proto.drop_tokens else f"{proto.capacity_factor:g}",
                    "eval batch": proto.batch_size,
                    "model": label(e),
                    "MoE - dense (nats)": -est.mean,
                    "sd": est.sd,
                    "n": est.n,
                    "dropped at eval (%)": 100 * float(dr[e].mean()) if e in dr.columns else math.nan,
                    "MoE lower (verdict)": v,
                }
            )
    return pd.DataFrame(rows)


def budget_gaps(df: pd.DataFrame) -> pd.DataFrame:
    """From the loss curves: (MoE - dense) validation loss at each evaluated token count, mean ± sd over seeds."""
    c = latest_curve(df)
    if c.empty or 1 not in set(c["d"]):
        return pd.DataFrame(columns=["model", "tokens", "gap", "sd", "n"])
    m = c.pivot_table(index=["seed", "tokens"], columns="d", values="value")
    rows = []
    for e in [x for x in m.columns if x != 1]:
        g = (m[e] - m[1]).dropna()
        for t, v in g.groupby(level="tokens"):
            est = Estimate.of(v.values)
            rows.append({"model": label(e), "tokens": int(t), "gap": est.mean, "sd": est.sd, "n": est.n})
    return pd.DataFrame(rows)


def completeness(df: pd.DataFrame, p) -> dict[str, Any]:
    """What the study's settings call for vs what the store holds: counts and the first missing items."""
    pre = pretrain_frame(df)
    primary = f"val_loss:{protocols(p)[0].name}"
    have_pre = {(int(r.seed), int(r.d)) for r in pre[pre["metric"] == primary].itertuples()}
    want_pre = [(s, e) for s in p.seeds for e in sorted(p.variants)]
    base = max(p.variants)
    acc = latest(df[(df["metric"] == "accuracy") & (df["stage"] == "stage2")])
    have = {(r.task, int(r.seed), r.method, int(r.z), int(r.d)) for r in acc.itertuples()}
    want = [(t, s, "none", e, e) for s in p.seeds for t in p.tasks for e in sorted(p.variants)]
    want += [(t, s, m, base, d) for s in p.seeds for t in p.tasks for m in p.methods for d in p.targets]
    miss_pre = [f"{label(e)} seed {s}" for s, e in want_pre if (s, e) not in have_pre]
    miss = [f"{t} seed {s} {m} {z}e->{d}e" if m != "none" else f"{t} seed {s} {label(d)}" for t, s, m, z, d in want]
    miss = [x for x, w in zip(miss, want) if w not in have]
    return {
        "pretrain": (len(want_pre) - len(miss_pre), len(want_pre)),
        "finetune": (len(want) - len(miss), len(want)),
        "missing": miss_pre + miss,
        "complete": not miss_pre and not miss,
    }


def compute_used(df: pd.DataFrame) -> pd.DataFrame:
    """Wall seconds per stage, summed over every execution recorded in the store (resumed runs add up)."""
    w = df[(df["task"] == RUN_TASK) & (df["metric"] == "wall_seconds")]
    rows = [{"stage": s.removeprefix("wall:"), "seconds": float(g["value"].sum())} for s, g in w.groupby("stage")]
    out = pd.DataFrame(rows, columns=["stage", "seconds"])
    if len(out):
        out = pd.concat([out, pd.DataFrame([{"stage": "total", "seconds": out["seconds"].sum()}])], ignore_index=True)
        out["minutes"] = out["seconds"] / 60
    return out


def pretrain_table(df: pd.DataFrame, p) -> pd.DataFrame:
    """Paper Fig 2a's numbers: per variant, sizes and validation loss (mean ± sd) under the paper's protocol and
    without drops, the share of MoE tokens dropped at eval, and the training throughput."""
    pre = pretrain_frame(df)
    paper, nodrop = protocols(p)[0].name, protocols(p)[1].name

    def ms(metric: str, e: int, dec: int = 3, scale: float = 1.0) -> str:
        v = pre[(pre["metric"] == metric) & (pre["d"] == e)]["value"] * scale
        est = Estimate.of(v)
        if est.n == 0:
            return ""
        return f"{est.mean:.{dec}f}" + (f" ± {est.sd:.{dec}f}" if est.n > 1 else "") + f" (n {est.n})"

    rows = []
    for e in sorted(p.variants):
        first = lambda m: pre[(pre["metric"] == m) & (pre["d"] == e)]["value"]  # noqa: E731
        rows.append(
            {
                "model": f"{p.backbone}+{e}e" if e > 1 else p.backbone,
                "params": int(first("params").iloc[0]) if len(first("params")) else None,
                "active params": int(first("active_params").iloc[0]) if len(first("active_params")) else None,
                f"val loss, cf 1.0 (`{paper}`)": ms(f"val_loss:{paper}", e),
                f"val loss, no drops (`{nodrop}`)": ms(f"val_loss:{nodrop}", e),
                "dropped at eval (%)": ms(f"drop_frac:{paper}", e, 1, 100.0) if e > 1 else "0",
                "train tokens/s": ms("tokens_per_s", e, 0),
            }
        )
    return pd.DataFrame(rows)


def floors_table(df: pd.DataFrame, p) -> pd.DataFrame:
    """Per task: chance, majority class, and the best / mean finetuned accuracy over every model (mean over seeds)."""
    base = max(p.variants)
    acc = task_frame(df, base, "accuracy")
    rows = []
    for task in p.tasks:
        f = df[(df["stage"] == "floor") & (df["task"] == task)]
        chance = f[f["metric"] == "chance"]["value"].mean() * 100
        major = f[f["metric"] == "majority"]["value"].mean() * 100
        if task in acc.index.get_level_values("task"):
            means = acc.xs(task, level="task").groupby(level="d").mean().stack().dropna() * 100
            best, mean = (means.max(), means.mean()) if len(means) else (math.nan, math.nan)
        else:
            best = mean = math.nan
        rows.append(
            {
                "task": task,
                "chance (%)": chance,
                "majority (%)": major,
                "mean over models (%)": mean,
                "best model (%)": best,
                "best - majority": best - major,
            }
        )
    return pd.DataFrame(rows)


def paper_layout_tables(df: pd.DataFrame, p) -> dict[str, str]:
    """Tables 1-4 (+ hybrid) in the paper's layout (mean ± sd over seeds, (+)/(-) vs scratch, bold best)."""
    acc = df[(df["metric"] == "accuracy") & (df["stage"] == "stage2")]
    out = {}
    if acc.empty:
        return out
    tasks = [t for t in p.tasks if t in set(acc["task"])]
    for name, methods in experiments.TABLES.items():
        present = [m for m in methods if m in set(acc["method"])]
        if present and tasks:
            out[name] = accuracy_table(acc, tasks, base_model=p.backbone, methods=present).to_markdown()
    return out
