"""The study's stages (notebook 05), each idempotent: pretrain, pretraining losses (+ router health), ablations, task
study, readouts without finetuning.

They reuse smoe_lab.experiments (notebooks 01 and 03 per seed) and smoe_lab.readout_study, and write every number into
the results store.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import cachekey, checkpoint, experiments, readout_study
from ..data.corpus import eval_window_starts, resolve_corpus
from ..evaluate import evaluate_task
from ..finetune import task_data
from ..results import checkpoint_identity
from ..router_health import FIELDS as HEALTH_FIELDS
from ..router_health import HealthMeter
from ..train import read_metrics
from .study import (
    HEALTH_STAGE,
    PRETRAIN_TASK,
    Protocol,
    health_metric,
    label,
    load_store,
    pretrain_frame,
    protocols,
    record_wall,
)


def pretrain_all(p) -> pd.DataFrame:
    """Every variant for every seed on the same tokens (per seed); one row per model (skips finished runs)."""
    store, t0, tables = load_store(p), time.perf_counter(), []
    for seed in p.seeds:
        tables.append(experiments.pretrain_variants(p.pretrain_notebook(seed)).assign(seed=seed))
    record_wall(store, p, "wall:pretrain", time.perf_counter() - t0)
    return pd.concat(tables, ignore_index=True)


def eval_windows(n_tokens: int, block_size: int, windows: int = 0) -> np.ndarray:
    """Start offsets of the fixed evaluation windows: every non-overlapping window of the stream (windows = 0) or
    `windows` of them spread evenly over it (`smoe_lab.data.corpus.eval_window_starts`). Same for every protocol."""
    return eval_window_starts(n_tokens, 1, block_size, windows or None)


@torch.no_grad()
def lm_loss(
    model, tokens: np.ndarray, starts: np.ndarray, proto: Protocol, meter: HealthMeter | None = None
) -> dict[str, float]:
    """Token-weighted LM loss over the windows at `starts` (in that order, batches of proto.batch_size, the last one
    smaller), in eval mode with the MoE layers set to proto's capacity factor and drop rule (restored afterwards);
    also the share of MoE-routed tokens that were dropped. meter: accumulates router health over the same passes."""
    block = model.config.block_size
    layers = model.moe_layers()
    saved = [(m.capacity_factor_eval, m.drop_tokens) for m in layers]
    was_training = model.training
    model.eval()
    total = count = dropped = routed = 0.0
    try:
        for m in layers:
            m.capacity_factor_eval, m.drop_tokens = proto.capacity_factor, proto.drop_tokens
        for i in range(0, len(starts), proto.batch_size):
            s = starts[i : i + proto.batch_size]
            buf = torch.from_numpy(np.asarray(tokens[s[:, None] + np.arange(block + 1)], dtype=np.int64))
            x, y = buf[:, :-1], buf[:, 1:]  # (B, T)
            _, loss, _ = model(x, y)
            total += float(loss) * y.numel()
            count += y.numel()
            tel = model.telemetry()
            for t in tel:
                if t is not None:
                    dropped += t.dropped_fraction * t.num_tokens
                    routed += t.num_tokens
            if meter is not None and layers:
                meter.update(tel)
    finally:
        for m, (cf, drop) in zip(layers, saved):
            m.capacity_factor_eval, m.drop_tokens = cf, drop
        model.train(was_training)
    return {"loss": total / count, "drop_frac": dropped / routed if routed else 0.0, "tokens": count}


def pretraining_losses(p) -> pd.DataFrame:
    """Loss of every pretrained model under every protocol, its loss curve, size and throughput -> results store.

    Rows: task "corpus:val", method "none", z = d = expert count, stage "pretrain" (metrics "val_loss:<protocol>",
    "drop_frac:<protocol>", "params", "active_params", "tokens_per_s", "train_tokens"), stage "curve" (metric
    "val_loss", extra {"step", "tokens"}: notebook 01's periodic evaluation) and, for an SMoE, stage "router": the
    router health of each MoE layer at the end of pretraining (`router_health`: entropy / ln E, top-1 gate, expert
    shares, drop fraction; metric "<field>:L<layer>") over the same validation windows under the paper's protocol.
    A model already measured with the same checkpoint and protocol is skipped. Returns one row per (seed, model,
    protocol).
    """
    store, t0 = load_store(p), time.perf_counter()
    done = set(store.rows(task=PRETRAIN_TASK)["config_hash"].dropna())
    tokens = resolve_corpus(p.corpus).split("val")
    val_key = cachekey.corpus_key(resolve_corpus(p.corpus).path)
    for seed in p.seeds:
        for e in sorted(p.variants):
            run_dir = experiments.pretrain_dir(p.study_dir, label(e), seed)
            ckpt = run_dir / "checkpoint"
            h = checkpoint.checkpoint_hash(ckpt)
            ident = dict(base_model=p.backbone, method="none", z=e, d=e, task=PRETRAIN_TASK, seed=seed)
            model = None
            for i, proto in enumerate(protocols(p)):
                parts = dict(ckpt=h, protocol=proto.__dict__, windows=p.eval_windows, val=val_key)
                key = cachekey.key("pretrain-eval", **parts)
                health_key = cachekey.key("router-health", **parts) if i == 0 and e > 1 else None
                if key not in done or (health_key and health_key not in done):
                    model = model or checkpoint.load(ckpt)
                    starts = eval_windows(len(tokens), model.config.block_size, p.eval_windows)
                    meter = HealthMeter() if health_key else None
                    r = lm_loss(model, tokens, starts, proto, meter)
                    if health_key and health_key not in done:
                        _record_health(store, ident, meter, proto, health_key)
                        done.add(health_key)
                if key not in done:
                    extra = {**proto.__dict__, "windows": len(starts), "eval_tokens": r["tokens"]}
                    rows = [
                        {**ident, "stage": "pretrain", "metric": f"val_loss:{proto.name}", "value": r["loss"]},
                        {**ident, "stage": "pretrain", "metric": f"drop_frac:{proto.name}", "value": r["drop_frac"]},
                    ]
                    store.append_many([{**row, "config_hash": key, "extra": extra} for row in rows])
                    done.add(key)
            key = cachekey.key("run-summary", ckpt=h)
            if key not in done:
                run = experiments.summarize_run(run_dir)
                rows = [
                    {**ident, "stage": "pretrain", "metric": m, "value": float(run[k])}
                    for m, k in (("params", "params"), ("active_params", "active_params"))
                    + (("tokens_per_s", "tokens_per_s"), ("train_tokens", "tokens"))
                ]
                curve = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
                rows += [
                    {
                        **ident,
                        "stage": "curve",
                        "metric": "val_loss",
                        "value": float(r["val_loss"]),
                        "extra": {"step": r["step"], "tokens": r["tokens"]},
                    }
                    for r in curve
                ]
                store.append_many([{**row, "config_hash": key} for row in rows])
                done.add(key)
    record_wall(store, p, "wall:pretrain_eval", time.perf_counter() - t0)
    df = pretrain_frame(store.rows(task=PRETRAIN_TASK, stage="pretrain"))
    return df[df["metric"].str.startswith("val_loss:")].reset_index(drop=True)


def _record_health(store, ident: dict, meter: HealthMeter, proto: Protocol, key: str) -> None:
    """One row per (router-health field, MoE layer): stage "router", metric "<field>:L<layer>"."""
    rows = []
    for layer, h in enumerate(meter.result()):
        extra = {"layer": layer, "num_experts": h.num_experts, "num_tokens": h.num_tokens, "protocol": proto.name}
        for f in HEALTH_FIELDS:
            v = float(getattr(h, f))
            rows.append({**ident, "stage": HEALTH_STAGE, "metric": health_metric(f, layer), "value": v, "extra": extra})
    store.append_many([{**r, "config_hash": key} for r in rows])


def budget_ablation(p) -> pd.DataFrame:
    """Training-budget ablation for claim (a): dense and the base variant pretrained with each of
    p.ablation_tokens (same recipe otherwise) for the first two seeds, measured with the paper's protocol and without
    drops. Rows: stage "budget", metric "val_loss:<protocol>@<tokens>" (extra {"tokens"}). Returns them."""
    store, t0 = load_store(p), time.perf_counter()
    done = set(store.rows(task=PRETRAIN_TASK, stage="budget")["config_hash"].dropna())
    val_key = cachekey.corpus_key(resolve_corpus(p.corpus).path)
    variants = sorted({1, max(p.variants)})
    val = None
    for tokens in p.ablation_tokens:
        for seed in p.seeds[:2]:
            out = str(Path(p.study_dir) / "budget" / f"tokens{tokens}")
            pn = dataclasses.replace(p.pretrain_notebook(seed), tokens=tokens, variants=variants, out_dir=out)
            experiments.pretrain_variants(pn)
            for e in variants:
                ckpt = experiments.pretrain_dir(pn.out_dir, label(e), seed) / "checkpoint"
                h = checkpoint.checkpoint_hash(ckpt)
                model = None
                for proto in protocols(p)[:2]:
                    parts = dict(ckpt=h, protocol=proto.__dict__, windows=p.eval_windows, val=val_key)
                    key = cachekey.key("pretrain-eval", **parts)
                    if key in done:
                        continue
                    if val is None:
                        val = resolve_corpus(p.corpus).split("val")
                    model = model or checkpoint.load(ckpt)
                    starts = eval_windows(len(val), model.config.block_size, p.eval_windows)
                    r = lm_loss(model, val, starts, proto)
                    store.append(
                        base_model=p.backbone,
                        method="none",
                        z=e,
                        d=e,
                        task=PRETRAIN_TASK,
                        stage="budget",
                        seed=seed,
                        metric=f"val_loss:{proto.name}@{tokens}",
                        value=r["loss"],
                        config_hash=key,
                        extra={**proto.__dict__, "tokens": tokens, "drop_frac": r["drop_frac"]},
                    )
                    done.add(key)
    record_wall(store, p, "wall:budget_ablation", time.perf_counter() - t0)
    return store.rows(task=PRETRAIN_TASK, stage="budget")


def zero_shot_ablation(p) -> pd.DataFrame:
    """Ablation for the task claims: every pretrained variant and every (method, D) reduction of the base evaluated
    on each task of p.zero_shot_tasks WITHOUT finetuning or router warm-up. The reductions use router "merge" (the
    frequency-weighted average of each group's router rows; a pruned layer keeps its kept rows), so no weight is
    trained after reduction: this isolates what each method preserves from what finetuning repairs. Same
    calibration artifacts as the task study. Rows: stage "zeroshot", metrics "accuracy" and "loss"."""
    store, t0, out = load_store(p), time.perf_counter(), Path(p.study_dir)
    done = set(store.rows(stage="zeroshot")["config_hash"].dropna())
    base = max(p.variants)
    for seed in p.seeds:
        base_ckpt = experiments.pretrain_dir(out, label(base), seed) / "checkpoint"
        for task in p.zero_shot_tasks:
            _, val = task_data(task, p.corpus, None, "auto", p.max_train_examples, p.max_eval_examples, seed)
            cal, cal_path = experiments.calibration_artifact(
                base_ckpt,
                task,
                "train",
                out,
                max_examples=p.calibration_examples,
                batch_size=p.calibration_batch_size,
                corpus=p.corpus,
                seed=seed,
            )
            jobs = [(None, None, e) for e in sorted(p.variants)] + [(m, d, None) for m in p.methods for d in p.targets]
            for method, d, e in jobs:
                if e is not None:
                    ckpt = experiments.pretrain_dir(out, label(e), seed) / "checkpoint"
                else:
                    ckpt, _ = experiments.reduced_checkpoint(
                        base_ckpt, cal, cal_path, method, d, out, "merge", seed, p.workers
                    )
                # the folder name is part of the key: two methods can produce identical weights (e.g. mcsmoe and
                # freq_merge when the global allocation gives every layer exactly D dominant experts)
                name = ckpt.parent.name if ckpt.name == "checkpoint" else ckpt.name
                h = checkpoint.checkpoint_hash(ckpt)
                key = cachekey.key("zeroshot", ckpt=h, name=name, task=task, val=cachekey.examples_hash(val))
                if key in done:
                    continue
                model, tok = checkpoint.load(ckpt), checkpoint.load_tokenizer(ckpt)
                r = evaluate_task(model, tok, val, p.calibration_batch_size)
                ident = checkpoint_identity(*checkpoint.read_config(ckpt), p.backbone)
                row = {**ident, "task": task, "stage": "zeroshot", "seed": seed, "config_hash": key}
                store.append_many(
                    [
                        {**row, "metric": "accuracy", "value": r["accuracy"], "seconds": r["seconds"]},
                        {**row, "metric": "loss", "value": r["loss"], "seconds": r["seconds"]},
                    ]
                )
                done.add(key)
    record_wall(store, p, "wall:zero_shot_ablation", time.perf_counter() - t0)
    rows = store.rows(stage="zeroshot", metric="accuracy")
    return rows[["task", "seed", "method", "z", "d", "value"]]


def task_study(p) -> pd.DataFrame:
    """experiments.pruning_study for every seed (one after the other, so an interrupted run leaves whole seeds),
    plus each task's chance and majority-class floor per seed. Returns the finetuning rows of every seed."""
    store, t0, frames = load_store(p), time.perf_counter(), []
    for seed in p.seeds:
        pp = p.pruning_notebook(seed)
        floors = experiments.task_baselines(p.tasks, p.corpus, p.max_train_examples, p.max_eval_examples, seed)
        have = store.rows(stage="floor", seed=seed)
        for r in floors.itertuples(index=False):
            for metric in ("chance", "majority"):
                if have.empty or not ((have["task"] == r.task) & (have["metric"] == metric)).any():
                    v = float(getattr(r, metric))
                    ident = dict(base_model=p.backbone, method="none", z=1, d=1, task=r.task, stage="floor")
                    extra = {"n_train": r.n_train, "n_eval": r.n_eval}
                    store.append(**ident, seed=seed, metric=metric, value=v, extra=extra)
        frames.append(experiments.pruning_study(pp))
    record_wall(store, p, "wall:tasks", time.perf_counter() - t0)
    return pd.concat(frames, ignore_index=True)


def readouts(p) -> pd.DataFrame:
    """The low-noise readouts without finetuning (`smoe_lab.readout_study`, notebook 03's stage) for every seed: per
    domain of p.readout_domains, the base calibrated on the domain's held-out documents, reduced with every method to
    every target (router p.readout_router, nothing trained afterwards); LM loss on the domain's validation stream of
    every reduction, of the unreduced base and of every other pretrained variant (the scratch models); per-layer
    reconstruction error of each reduction. Rows: task "corpus:val_<domain>", stage "zeroshot", metrics "lm_loss",
    "drop_frac", "recon_routed", "recon_mapped" (per-layer values in extra). Each model is measured once per cache
    key (`smoe_lab.cachekey`). Returns one row per (seed, domain, model); empty when readout_domains is []."""
    if not p.readout_domains:
        return pd.DataFrame()
    store, t0, frames = load_store(p), time.perf_counter(), []
    for seed in p.seeds:
        frames.append(readout_study.readout_study(p.pruning_notebook(seed)).assign(seed=seed))
    record_wall(store, p, "wall:readouts", time.perf_counter() - t0)
    return pd.concat(frames, ignore_index=True)
