"""Notebook 01's stages: pretrain the variants (cached on their key), summarise runs, router-health tables.
Re-exported by smoe_lab.experiments (see its docstring for the caching rule)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .. import checkpoint, progress
from ..data.corpus import resolve_corpus
from ..loop import read_metrics
from ..notebook_params import PretrainNotebook
from ..progress import report as progress_report
from ..progress import stage as progress_stage
from ..router_health import last_health, specialisation_warning
from ..train import pretrain, pretrain_key


def variant_label(num_experts: int) -> str:
    return "dense" if num_experts == 1 else f"{num_experts}e"


def _same_run(run_dir: Path, key: str) -> dict[str, Any] | None:
    """The meta of run_dir's checkpoint when it was made under this cache key, else None (also when unreadable)."""
    try:
        _, meta = checkpoint.read_config(run_dir / "checkpoint")
    except (FileNotFoundError, ValueError):
        return None
    return meta if meta.get("cache_key") == key else None


def _finished(run_dir: Path, model_cfg, train_cfg, corpus) -> bool:
    """True when run_dir holds a checkpoint at the last step made under this cache key (`train.pretrain_key`:
    the package source, both configs, the corpus's content)."""
    meta = _same_run(run_dir, pretrain_key(model_cfg, train_cfg, resolve_corpus(corpus).path))
    return meta is not None and meta.get("step") == train_cfg.max_steps


def _partial(run_dir: Path, model_cfg, train_cfg, corpus) -> bool:
    """A checkpoint of the same cache key that stopped early: resume it instead of starting again."""
    meta = _same_run(run_dir, pretrain_key(model_cfg, train_cfg, resolve_corpus(corpus).path))
    try:
        return meta is not None and checkpoint.load_train_state(run_dir / "checkpoint") is not None
    except ValueError:
        return False  # an unreadable train state: start again


def pretrain_variants(p: PretrainNotebook) -> pd.DataFrame:
    """Pretrain every variant on the same token budget; returns one row per model (the notebook's table).

    p.workers > 1 trains that many variants at once, each in a spawned process with cpu_count // workers threads
    (on a small CPU two 1-thread processes get more done than one 2-thread process, and far more when other work
    shares the machine); the notebook's process reports their steps as they go (smoe_lab.progress)."""
    train_cfg = p.train_config()
    jobs = []
    for e in p.variants:
        model_cfg = p.model_config(e)
        run_dir = Path(p.out_dir) / "pretrain" / f"{variant_label(e)}-s{p.seed}"
        if _finished(run_dir, model_cfg, train_cfg, p.corpus):
            print(f"{variant_label(e)}: up to date ({run_dir})")
            progress_report(f"pretrain {variant_label(e)}: up to date")
        else:
            jobs.append((variant_label(e), model_cfg, run_dir, _partial(run_dir, model_cfg, train_cfg, p.corpus)))
    if p.workers > 1 and len(jobs) > 1:  # the largest models first: the last one to start is the quickest
        _pretrain_parallel(
            sorted(jobs, key=lambda j: -max(j[1].experts_per_layer or [1])), train_cfg, p.corpus, p.workers
        )
    else:
        for label, model_cfg, run_dir, resume in jobs:
            with progress_stage(f"pretrain {label} ({train_cfg.max_steps} steps)"):
                pretrain(model_cfg, train_cfg, p.corpus, run_dir, resume=resume, progress=p.progress)
    return pd.DataFrame(
        [summarize_run(Path(p.out_dir) / "pretrain" / f"{variant_label(e)}-s{p.seed}") for e in p.variants]
    )


def _worker_init(threads: int) -> None:
    """A pool worker: its share of the cores, and no progress lines of its own (its parent reports for it)."""
    torch.set_num_threads(threads)
    os.environ[progress.ENV] = "0"


def _step_text(run_dir: Path, total: int) -> str:
    """'70/147' from a run's metrics.jsonl; 'queued' before it has one."""
    try:
        rows = read_metrics(run_dir / "metrics.jsonl")
    except (OSError, ValueError):
        return "queued"
    return f"{max((int(r.get('step', 0)) for r in rows), default=0)}/{total}"


def _pretrain_parallel(jobs, train_cfg, corpus, workers: int, every: float = 20.0) -> None:
    """Train (label, model_cfg, run_dir, resume) jobs in `workers` spawned processes; the first error is raised."""
    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    progress_report(f"pretrain {', '.join(j[0] for j in jobs)}: {workers} at a time, {threads} thread(s) each")
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch thread pools
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {
            pool.submit(pretrain, cfg, train_cfg, corpus, run_dir, resume, False): (label, run_dir)
            for label, cfg, run_dir, resume in jobs
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=every, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()  # a worker's exception (e.g. a NaN loss) stops the notebook here
                label, _ = futures[f]
                progress_report(f"pretrain {label}: done ({time.perf_counter() - t0:.0f}s)")
            if pending:
                steps = [f"{futures[f][0]} {_step_text(futures[f][1], train_cfg.max_steps)}" for f in pending]
                progress_report("pretrain steps: " + ", ".join(steps))


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """One table row from a pretraining run folder: sizes, budget, final losses, time."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    metrics = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in metrics if r["kind"] == "train"]
    evals = [r for r in metrics if r["kind"] == "eval"]
    tps = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    return {
        "model": meta["label"],
        "params": meta["params"],
        "active_params": meta["active_params"],
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
        "train_loss": train[-1]["loss"],
        "val_loss": evals[-1]["val_loss"] if evals else float("nan"),
        "tokens_per_s": round(sum(tps) / len(tps), 1),
        "drop_frac_last": (sum(train[-1]["drop_frac"]) / len(train[-1]["drop_frac"]))
        if "drop_frac" in train[-1]
        else 0.0,
        **_health_columns(metrics),
        "run_dir": str(run_dir),
    }


def _health_columns(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Router health at the end of a run (last evaluation): worst layer's entropy / ln E, mean top-1 gate, and the
    plain warning when a layer stayed above 0.8 ln E (smoe_lab.router_health)."""
    h = last_health(metrics)
    if not h:
        return {"entropy_ratio_max": float("nan"), "top1_gate_mean": float("nan"), "router_warning": ""}
    return {
        "entropy_ratio_max": max(h["entropy_ratio"]),
        "top1_gate_mean": round(sum(h["top1_gate"]) / len(h["top1_gate"]), 4),
        "router_warning": specialisation_warning(h["entropy_ratio"]) or "",
    }


def router_health_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (SMoE model, MoE layer): router health at the end of pretraining (last evaluation, validation
    data): entropy / ln E, mean top-1 gate, largest and smallest expert share, drop fraction (router_health)."""
    rows = []
    for r in table.itertuples():
        h = last_health(read_metrics(Path(r.run_dir) / "metrics.jsonl"))
        for layer in range(len(h.get("entropy_ratio", []))):
            rows.append({"model": r.model, "layer": layer, **{k: v[layer] for k, v in h.items()}})
    return pd.DataFrame(rows)


def load_curves(table: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    return {row.model: read_metrics(Path(row.run_dir) / "metrics.jsonl") for row in table.itertuples()}


def save_table(table: pd.DataFrame, out_dir: str | Path, name: str, markdown: str | None = None) -> dict[str, str]:
    """CSV + Markdown copies of a table under out_dir/tables (markdown: a rendering to use instead of the plain one)."""
    out = Path(out_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": str(out / f"{name}.csv"), "md": str(out / f"{name}.md")}
    table.to_csv(paths["csv"], index=False)
    Path(paths["md"]).write_text((markdown or table.to_markdown(index=False)) + "\n")
    return paths
