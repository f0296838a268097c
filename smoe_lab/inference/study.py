"""Notebook 04's inference-cost stages: profile notebook 01's variants and notebook 03's reduced models under expert
parallelism, and build the tables behind Figs 2a, 2b, 4, 5 and the payoff of a reduction.

    profile_study(out_dir, ep_profile, ...)  -> InferenceStudy (profile, layers, scaling, payoff, dense_equivalent)

Everything is measured by `smoe_lab.inference.ep_profile.run_profile` into out_dir/profile (and out_dir/profile_scaling
for Fig 5 when it needs other rank counts); the figures are `smoe_lab.inference.figures`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .. import checkpoint
from ..experiments import pretrain_dir, pretrained_variants, summarize_run
from ..model import GPT
from ..progress import report
from ..results import ResultsStore
from .ep_profile import ProfileConfig, checkpoint_models, read_layers, run_profile
from .scaling import S_BASE, dense_equivalent_table

PAPER_BACKBONE = 354e6  # the paper's 354M dense GPT-2 (Fig 2b)
PAPER_EXPERTS = [8, 32, 64, 128]


@dataclass
class InferenceStudy:
    profile: pd.DataFrame  # one row per (model, ranks): profile.csv joined with notebook 01's losses
    layers: pd.DataFrame  # one row per (model, ranks, MoE layer)
    scaling: pd.DataFrame  # Fig 5: the scaling model at every scaling rank count
    payoff: pd.DataFrame  # unreduced base vs reduced vs scratch model of the reduced size
    dense_equivalent: pd.DataFrame  # Fig 2b: Clark et al.'s N̄ for the paper's and this backbone
    scaling_model: str = ""
    profile_dir: str = ""
    notes: list[str] = field(default_factory=list)


def reduced_checkpoints(out_dir: str | Path, base_ckpt: Path, methods: list[str]) -> list[tuple[str, int, Path]]:
    """(method, D, folder) of notebook 03's reduced checkpoints of `base_ckpt`, one per (method, D)."""
    found: dict[tuple[str, int], Path] = {}
    root = Path(out_dir) / "reduced"
    for cfg_file in sorted(root.glob("*/config.json")):
        folder = cfg_file.parent
        cfg, meta = checkpoint.read_config(folder)
        method = meta.get("method") or meta.get("reduction", {}).get("method")  # notebook 03 / `smoe-lab reduce`
        if meta.get("kind") != "reduced" or method not in methods:
            continue
        parent = Path(meta.get("parent", ""))
        if parent.resolve() != base_ckpt.resolve() and parent.parts[-3:] != base_ckpt.parts[-3:]:
            continue  # (the tail .../pretrain/<variant>-s<seed>/checkpoint also matches a run folder moved since)
        key = (method, max(cfg.experts_per_layer))
        found.setdefault(key, folder)  # every task's reduction to D has the same shapes: the first stands for all
    return [(m, d, p) for (m, d), p in sorted(found.items(), key=lambda kv: (-kv[0][1], kv[0][0]))]


def _label_reduced(base: str, d: int, method: str) -> str:
    return f"{base}->{d}e {method}"


def _accuracy(out_dir: Path) -> pd.DataFrame:
    """Stage-2 accuracy per (method, z, d, task), latest row per seed, mean over seeds (empty without a store)."""
    path = out_dir / "results.sqlite"
    if not path.is_file():
        return pd.DataFrame()

    df = ResultsStore(path).rows(metric="accuracy")
    if df.empty:
        return df
    df = df[df["stage"] == "stage2"] if "stage2" in set(df["stage"]) else df
    keys = ["base_model", "method", "z", "d", "task", "stage", "seed", "metric"]
    df = df.sort_values("id").groupby(keys, as_index=False).tail(1)
    return df.groupby(["method", "z", "d", "task"], as_index=False)["value"].mean()


def payoff_table(profile: pd.DataFrame, base: str, reduced: list[tuple[str, int, str]], out_dir: Path) -> pd.DataFrame:
    """Per rank count: the unreduced base, each reduced model and the scratch model of its size, side by side."""
    acc = _accuracy(Path(out_dir))
    z = int(profile.loc[profile["model"] == base, "experts"].iloc[0])
    wanted: list[tuple[str, str, int, int]] = [(base, "none", z, z)]  # (label, method, z, d)
    for method, d, label in reduced:
        wanted.append((label, method, z, d))
        scratch = "dense" if d == 1 else f"{d}e"
        if (profile["model"] == scratch).any() and (scratch, "none", d, d) not in wanted:
            wanted.append((scratch, "none", d, d))
    cols = ["latency_ms", "latency_ms_q25", "latency_ms_q75", "tokens_per_s", "all2all_ms", "expert_ms"]
    cols += ["peak_mem_mb", "weights_mb", "params"]
    rows = []
    for ranks, prof in profile.groupby("ranks"):
        ref = prof[prof["model"] == base]
        if ref.empty:
            continue
        ref = ref.iloc[0]
        for label, method, zz, d in wanted:
            hit = prof[prof["model"] == label]
            if hit.empty:
                continue
            r = hit.iloc[0]
            row = {"model": label, "kind": _kind(method, zz, d, z), "ranks": int(ranks), "experts": d}
            row.update({c: r.get(c) for c in cols})
            row["latency_vs_base"] = r["latency_ms"] / ref["latency_ms"]
            row["peak_mem_vs_base"] = r["peak_mem_mb"] / ref["peak_mem_mb"]
            if not acc.empty:
                sel = acc[(acc["method"] == method) & (acc["z"] == zz) & (acc["d"] == d)]
                for _, a in sel.iterrows():
                    row[f"accuracy_{a['task']}"] = round(float(a["value"]), 4)
            rows.append(row)
    return pd.DataFrame(rows)


def _kind(method: str, z: int, d: int, base_z: int) -> str:
    if method != "none":
        return f"reduced ({method})"
    return "unreduced base" if z == base_z else "trained from scratch"


def dense_equivalents(variants: pd.DataFrame, fit=S_BASE) -> pd.DataFrame:
    """Fig 2b's numbers: N̄ for the paper's 354M backbone at 8-128 experts, and for this run's dense backbone
    (non-embedding parameters of notebook 01's dense variant, else of the smallest model's active path) at its
    expert counts, with the measured validation loss beside each expert count."""
    tables = [dense_equivalent_table(PAPER_BACKBONE, PAPER_EXPERTS, fit, label="paper: 354M")]
    if not variants.empty:
        n = float(variants["backbone_params"].iloc[0])
        experts = sorted(set(int(e) for e in variants["experts"]) | {1})
        ours = dense_equivalent_table(n, experts, fit, label=f"this run: {n / 1e6:.2g}M")
        loss = dict(zip(variants["experts"].astype(int), variants["val_loss"]))
        ours["measured_val_loss"] = ours["experts"].map(loss)
        tables.append(ours)
    return pd.concat(tables, ignore_index=True)


def _backbone_params(ckpt: Path) -> int:
    """Non-embedding parameters of the dense backbone a checkpoint's config implies (one expert per MoE layer)."""
    import torch

    cfg, _ = checkpoint.read_config(ckpt)
    with torch.device("meta"):  # shapes only: no memory, no init cost, at any size
        dense = GPT(cfg.replace(num_experts=1, moe_impl="native", ep_size=1))
    return dense.num_params() - dense.transformer.wte.weight.numel() - dense.transformer.wpe.weight.numel()


def profile_study(
    out_dir: str | Path,
    ep_profile: dict[str, Any],
    scaling_ranks: list[int] | None = None,
    payoff_methods: list[str] | None = None,
    seed: int = 0,
    log=print,
) -> InferenceStudy:
    """Profile every finished notebook-01 variant and notebook-03 reduction of the largest variant. Each launch of
    ranks is also a progress line on a batch run's terminal (smoe_lab.progress)."""

    def say(msg: str, _log=log) -> None:
        _log(msg)
        report(f"EP profile: {msg.removeprefix('[profile] ')}")

    log = say
    out = Path(out_dir)
    cfg = ProfileConfig.from_dict(ep_profile)
    names = pretrained_variants(out, seed)
    if not names:
        raise FileNotFoundError(f"no pretrained variants under {out / 'pretrain'}: run notebook 01 first")
    ckpts = {v: pretrain_dir(out, v, seed) / "checkpoint" for v in names}
    models = checkpoint_models([f"{v}={p}" for v, p in ckpts.items()])
    moe = [v for v in names if v != "dense"]
    base = moe[-1] if moe else names[-1]
    reduced = []
    for method, d, folder in reduced_checkpoints(out, ckpts[base], payoff_methods or []):
        label = _label_reduced(base, d, method)
        models += checkpoint_models([f"{label}={folder}"])
        reduced.append((method, d, label))
    notes = []
    table = run_profile(models, cfg, out / "profile", log=log)
    runs = {v: summarize_run(pretrain_dir(out, v, seed)) for v in names}
    table["val_loss"] = table["model"].map({v: r["val_loss"] for v, r in runs.items()})
    layers = read_layers(out / "profile")
    scaling_ranks = sorted(scaling_ranks or cfg.ranks)
    scaling = table[(table["model"] == base) & table["ranks"].isin(scaling_ranks)]
    extra = [r for r in scaling_ranks if r not in cfg.ranks]
    if extra:  # Fig 5's other rank counts: the base model alone, latency only (every rank count is its own group)
        scfg = cfg.replace(ranks=extra, memory=False)
        more = run_profile([m for m in models if m.label == base], scfg, out / "profile_scaling", log=log)
        scaling = pd.concat([scaling, more], ignore_index=True)
        notes.append(f"Fig 5: {base} at ranks {extra} measured on its own (out_dir/profile_scaling), the rest above")
    scaling = scaling.sort_values("ranks").reset_index(drop=True)
    variants = table[table["model"].isin(names) & (table["ranks"] == cfg.ranks[0])][["model", "experts", "val_loss"]]
    variants = variants.assign(backbone_params=_backbone_params(ckpts[names[0]]))
    return InferenceStudy(
        profile=table,
        layers=layers,
        scaling=scaling,
        payoff=payoff_table(table, base, reduced, out),
        dense_equivalent=dense_equivalents(variants),
        scaling_model=base,
        profile_dir=str(out / "profile"),
        notes=notes,
    )


__all__ = ["InferenceStudy", "dense_equivalents", "payoff_table", "profile_study", "reduced_checkpoints"]
