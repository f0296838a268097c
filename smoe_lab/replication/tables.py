"""The report's tables, computed from the results store's rows (a DataFrame of ResultsStore.rows())."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .. import experiments
from ..results import accuracy_table
from ..router_health import WARN_ENTROPY_RATIO, specialisation_warning
from .stats import Estimate, verdict
from .study import (
    PRETRAIN_TASK,
    READOUT_PREFIX,
    RUN_TASK,
    health_frame,
    label,
    latest,
    latest_curve,
    pretrain_frame,
    protocols,
    readout_frame,
    reconstruction_layers,
    task_frame,
    threshold_factors,
)


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
    lm = latest(df[(df["stage"] == "zeroshot") & (df["metric"] == "lm_loss")])
    have_ro = {(r.task, int(r.seed), r.method, int(r.z), int(r.d)) for r in lm.itertuples()}
    doms = [f"{READOUT_PREFIX}{x}" for x in getattr(p, "readout_domains", [])]
    want_ro = [(t, s, "none", e, e) for s in p.seeds for t in doms for e in sorted(p.variants)]
    want_ro += [(t, s, m, base, d) for s in p.seeds for t in doms for m in p.methods for d in p.targets]
    miss_ro = [
        f"readout {t.removeprefix(READOUT_PREFIX)} seed {s} " + (f"{m} {z}e->{d}e" if m != "none" else label(d))
        for t, s, m, z, d in want_ro
        if (t, s, m, z, d) not in have_ro
    ]
    miss = [f"{t} seed {s} {m} {z}e->{d}e" if m != "none" else f"{t} seed {s} {label(d)}" for t, s, m, z, d in want]
    miss = [x for x, w in zip(miss, want) if w not in have]
    return {
        "pretrain": (len(want_pre) - len(miss_pre), len(want_pre)),
        "finetune": (len(want) - len(miss), len(want)),
        "readouts": (len(want_ro) - len(miss_ro), len(want_ro)),
        "missing": miss_pre + miss + miss_ro,
        "complete": not miss_pre and not miss and not miss_ro,
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


def _ms(values, dec: int = 3, signed: bool = False) -> str:
    """ "mean ± sd" of per-seed values ("" without any; no ± for one value)."""
    est = Estimate.of(values)
    if est.n == 0:
        return ""
    fmt = f"{'+' if signed else ''}.{dec}f"
    return f"{est.mean:{fmt}}" + (f" ± {est.sd:.{dec}f}" if est.n > 1 else "")


# -- router health -------------------------------------------------------------------------------------------------
HEALTH_COLUMNS = {
    "entropy_ratio": "entropy / ln E",
    "top1_gate": "mean top-1 gate",
    "max_share": "max expert share",
    "drop_frac": "dropped",
}


def router_health_table(df: pd.DataFrame, p) -> pd.DataFrame:
    """One row per pretrained SMoE (variant, seed): per MoE layer (values "layer 0 / layer 1 / ...") router entropy
    / ln E, mean top-1 gate, the largest expert's token share and the dropped share, at the end of pretraining on the
    validation windows under the paper's protocol (stage "router"); and whether a layer is above 0.8 ln E."""
    h = health_frame(df)
    rows = []
    for (e, seed), g in h.groupby(["d", "seed"]):
        row: dict[str, Any] = {"model": label(int(e)), "seed": int(seed)}
        for f, name in HEALTH_COLUMNS.items():
            v = g[g["field"] == f].sort_values("layer")["value"]
            row[name + " (per layer)"] = " / ".join(f"{x:.3f}" for x in v)
        ratios = g[g["field"] == "entropy_ratio"]["value"]
        row["specialised"] = "yes" if (ratios <= WARN_ENTROPY_RATIO).all() else "**no**"
        rows.append(row)
    return pd.DataFrame(rows)


def router_health_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per SMoE variant: the worst layer's entropy / ln E and the mean top-1 gate, mean ± sd over seeds."""
    h = health_frame(df)
    rows = []
    for e, g in h.groupby("d"):
        ent = g[g["field"] == "entropy_ratio"].groupby("seed")["value"].max()
        gate = g[g["field"] == "top1_gate"].groupby("seed")["value"].mean()
        drop = g[g["field"] == "drop_frac"].groupby("seed")["value"].mean()
        rows.append(
            {
                "model": label(int(e)),
                "worst layer entropy / ln E": _ms(ent),
                "mean top-1 gate": _ms(gate),
                "dropped at eval": _ms(drop),
                "seeds": len(ent),
                "worst": float(ent.mean()) if len(ent) else math.nan,
            }
        )
    return pd.DataFrame(rows)


def router_warnings(df: pd.DataFrame) -> list[str]:
    """The plain warning (`router_health.specialisation_warning`) of every pretrained model that ends with a router
    entropy above 0.8 ln E in some MoE layer: "32e seed 1: routers did not specialise: ..."."""
    h = health_frame(df)
    out = []
    for (e, seed), g in h.groupby(["d", "seed"]):
        ratios = g[g["field"] == "entropy_ratio"].sort_values("layer")["value"].tolist()
        w = specialisation_warning(ratios)
        if w:
            out.append(f"{label(int(e))} seed {int(seed)}: {w}")
    return out


# -- readouts without finetuning -----------------------------------------------------------------------------------
def _kinds(frame: pd.DataFrame, p) -> list[str]:
    return ["scratch"] + [m for m in p.methods if m in frame.columns]


def readout_loss_table(df: pd.DataFrame, p) -> pd.DataFrame:
    """Zero-shot domain LM loss minus the unreduced base's, paired by seed (mean ± sd over seeds), per (domain, target
    D): the scratch model with D experts ("scratch D") and every reduction base -> D; also the unreduced base's own LM
    loss and, as the last row of a domain (D = 1), the dense model's."""
    base = max(p.variants)
    lm = readout_frame(df, base, "lm_loss")
    rows = []
    if lm.empty:
        return pd.DataFrame(rows)
    for task in sorted(set(lm.index.get_level_values("task"))):
        t = lm.xs(task, level="task")
        if base not in t.index.get_level_values("d") or "scratch" not in t.columns:
            continue
        ref = t.xs(base, level="d")["scratch"]  # per seed
        have = set(t.index.get_level_values("d"))
        ds = [d for d in sorted(p.targets, reverse=True) if d in have] + (
            [1] if 1 in have and 1 not in p.targets else []
        )
        for d in ds:
            cell = t.xs(d, level="d")
            row: dict[str, Any] = {
                "domain": task.removeprefix(READOUT_PREFIX),
                "D": int(d),
                f"{label(base)} (unreduced) LM loss": _ms(ref.values),
            }
            for kind in _kinds(t, p):
                if kind in cell.columns:
                    diff = (cell[kind] - ref.reindex(cell.index)).dropna()
                    row["scratch D" if kind == "scratch" else kind] = _ms(diff.values, signed=True)
            rows.append(row)
    return pd.DataFrame(rows)


def readout_recon_table(df: pd.DataFrame, p, kind: str = "mapped") -> pd.DataFrame:
    """Per-layer output reconstruction error of every reduction (`kind`: "mapped" = the experts' weights through the
    base router and the reduction's map, "routed" = the reduced layer with its own merged router), mean ± sd over
    seeds, one row per (domain, D, MoE layer), one column per method."""
    rec = reconstruction_layers(df, max(p.variants))
    if rec.empty:
        return pd.DataFrame()
    rows = []
    for (domain, d, layer), g in rec.groupby(["domain", "d", "layer"]):
        row: dict[str, Any] = {"domain": domain, "D": int(d), "layer": int(layer)}
        for m in [x for x in p.methods if x in set(g["method"])]:
            row[m] = _ms(g[g["method"] == m][kind].values)
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values(["domain", "D", "layer"], ascending=[True, False, True]).reset_index(drop=True)


def threshold_table(claim_d, p) -> pd.DataFrame:
    """Claim (d) per factor: the side of the paper's threshold, the finetuned accuracy, finetuned loss and zero-shot
    LM-loss readouts (oriented differences mean ± sd, with their verdicts); untested factors say why."""
    by = {kind: {x.name: x for x in parts} for kind, parts in (("acc", claim_d.parts), ("loss", claim_d.secondary))}
    by["readout"] = {x.name: x for x in claim_d.readout}
    base = max(p.variants)
    rows = []
    for t in threshold_factors(p):
        d, f, side = t["d"], t["factor"], t["side"]
        row: dict[str, Any] = {"factor": f"{f:g}x", f"{label(base)} -> D": f"{label(d)}", "paper": side}
        if not t["tested"]:
            row["accuracy (points)"] = f"untested: no scratch {label(d)} model"
            rows.append(row)
            continue
        better, worse = ("uncurl", "scratch") if side == "keeps" else ("scratch", "uncurl")
        name = f"{f:g}x ({base}e->{d}e) {side} the advantage: {better} vs {worse}"
        row["positive means"] = f"{better} better than {worse}"
        for kind, title, dec in (("acc", "accuracy (points)", 2), ("loss", "finetuned loss (nats)", 3)):
            x = by[kind].get(name)
            row[title] = f"{x.est.text(dec)}: {x.verdict}" if x else "no data"
        x = by["readout"].get(name)
        row["zero-shot LM loss (nats)"] = f"{x.est.text(3)}: {x.verdict}" if x else "no data"
        rows.append(row)
    return pd.DataFrame(rows)
