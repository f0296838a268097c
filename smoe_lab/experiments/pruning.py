"""Notebook 03's stages: reduced checkpoints, finetune-and-record, stage-1 checkpoints, the pruning study, task
baselines.
Re-exported by smoe_lab.experiments (see its docstring for the caching rule)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from .. import cachekey, checkpoint
from ..data.corpus import resolve_corpus
from ..evaluate import chance_baseline, majority_baseline
from ..finetune import INSTRUCTIONS, FinetuneConfig, data_spec, finetune, store_rows, task_data
from ..progress import report as progress_report
from ..protocol import dev_split
from ..reduce.methods import reduce_model
from ..results import ResultsStore, checkpoint_identity
from .calibration import calibration_artifact, checkpoint_name, find_checkpoint, reference_checkpoints
from .pretraining import _worker_init


# -- 03: reduce + finetune + evaluate ------------------------------------------------------------------------------
def results_store(out_dir: str | Path):
    return ResultsStore(Path(out_dir) / "results.sqlite")


def _done(path: Path, key: str) -> dict[str, Any] | None:
    """A finished step's saved result when it was made under the same cache key, else None (also if unreadable)."""
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(doc, dict) and doc.get("key") == key:
            return doc
    return None


def reduced_checkpoint(
    base_ckpt: Path, cal, cal_path: Path, method: str, d: int, out_dir: Path, router: str, seed: int, workers: int
) -> tuple[Path, dict[str, Any]]:
    """Reduce once per cache key (package source, base weights, calibration content, method, D, router, seed);
    the reduced checkpoint is reused."""
    dest = out_dir / "reduced" / f"{cal_path.stem}-{method}-D{d}-{router}-s{seed}"  # stem names base + task
    cal_key = cal.manifest.get("cache_key") or cachekey.file_hash(cal_path)
    base = checkpoint.checkpoint_hash(base_ckpt)
    key = cachekey.key("reduced", base=base, calibration=cal_key, method=method, d=d, router=router, seed=seed)
    done = _done(dest.parent / f"{dest.name}.json", key)
    if done and (dest / "config.json").is_file():
        return dest, done["report"]
    model = checkpoint.load(base_ckpt)
    progress_report(f"reduce {method} -> D={d}")
    new, report = reduce_model(model, method, d, cal, seed=seed, router=router, workers=workers)
    _, meta = checkpoint.read_config(base_ckpt)
    report_doc = report.to_dict()
    checkpoint.save(
        new,
        dest,
        tokenizer=checkpoint.load_tokenizer(base_ckpt),
        **{**meta, "kind": "reduced", "parent": str(base_ckpt), "method": method, "reduction": report_doc},
    )
    checkpoint.atomic_write_text(dest.parent / f"{dest.name}.json", json.dumps({"key": key, "report": report_doc}))
    return dest, report_doc


def finetune_and_record(
    ckpt: Path,
    task: str,
    train,
    val,
    cfg,
    out_dir: Path,
    store,
    backbone: str,
    progress: bool,
    extra: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    warmup_examples=None,
) -> dict[str, Any]:
    """Finetune a checkpoint on a task (skipped when done under the same cache key); rows into the results store.

    The protocol (`smoe_lab.protocol`): select on a dev split carved from `train`, report the selected checkpoint
    once on `val`. Stored: "accuracy", "acc_norm", "loss" (reported) and "dev_accuracy", "dev_acc_norm",
    "dev_loss" (selection). spec: how train/val were loaded (`finetune.data_spec`), so `smoe-lab evaluate` on the
    selected checkpoint reproduces the stored numbers. warmup_examples: the router warm-up's data (default train).
    """
    model_cfg, meta = checkpoint.read_config(ckpt)
    ident = checkpoint_identity(model_cfg, meta, backbone)
    name = checkpoint_name(ckpt)  # pretrain run folder, reduced name, or a Hugging Face model's name
    run_dir = out_dir / "finetune" / task / name
    parts = {"ckpt": checkpoint.checkpoint_hash(ckpt), "cfg": cfg.to_dict(), "spec": spec}
    parts.update(train=cachekey.examples_hash(train), val=cachekey.examples_hash(val))
    if warmup_examples is not None:
        parts["warmup"] = cachekey.examples_hash(warmup_examples)
    key = cachekey.key("finetune", **parts)
    done = _done(run_dir / "result.json", key)
    if done:
        return done["row"]
    model = checkpoint.load(ckpt)
    tok = checkpoint.load_tokenizer(ckpt)
    progress_report(f"finetune {name} on {task} ({cfg.stage})")
    res = finetune(
        model,
        tok,
        train,
        val,
        cfg,
        run_dir,
        progress=progress,
        meta={**ident, "task": task},
        warmup_examples=warmup_examples,
        data_spec=spec,
    )
    row = {
        **ident,
        "task": task,
        "stage": cfg.stage,
        "seed": cfg.seed,
        "accuracy": res.accuracy,
        "acc_norm": res.acc_norm,
        "loss": res.loss,
        "dev_accuracy": res.dev_accuracy,
        "dev_loss": res.dev_loss,
        "n_eval": res.n_report,  # validation examples behind accuracy (its Wilson interval in the figures)
        "top_pred_share": res.top_pred_share,  # 1.0: the model gives one answer to every example
        "best_step": res.best_step,
        "steps": res.steps,
        "seconds": round(res.seconds, 2),
        "run_dir": str(run_dir),
        **(extra or {}),
    }
    common = {
        **ident,
        "task": task,
        "stage": cfg.stage,
        "seed": cfg.seed,
        "config_hash": key[:16],
        "seconds": res.seconds,
        "extra": extra or {},
    }
    store.append_many(store_rows(res, common))
    checkpoint.atomic_write_text(run_dir / "result.json", json.dumps({"key": key, "row": row}, default=str))
    return row


def stage1_checkpoint(
    ckpt: Path,
    cfg,
    out_dir: Path,
    corpus: str | None,
    max_examples: int,
    backbone: str,
    progress: bool,
    warmup_examples=None,
) -> Path:
    """Stage 1 of the paper's finetuning (instruction mix + pretraining windows at cfg.mix_ratio), once per model.

    Runs before the task finetune; for a reduced model it is the first training after reduction, so its router-only
    warm-up runs here first: on warmup_examples (the task's training examples: the paper's A4) when given, else on
    the instruction mix. Returns the stage-1 checkpoint (skipped when done under the same cache key).
    """
    name = checkpoint_name(ckpt)
    run_dir = out_dir / "stage1" / name
    model_cfg, meta = checkpoint.read_config(ckpt)
    train, val = task_data(INSTRUCTIONS, corpus, None, "auto", max_examples, max(1, max_examples // 4), cfg.seed)
    warm = warmup_examples if model_cfg.expert_map is not None and cfg.router_warmup_steps > 0 else None
    parts = {"ckpt": checkpoint.checkpoint_hash(ckpt), "cfg": cfg.to_dict(), "train": cachekey.examples_hash(train)}
    parts.update(val=cachekey.examples_hash(val), corpus=cachekey.corpus_key(corpus) if cfg.mix_ratio > 0 else None)
    parts["warmup"] = None if warm is None else cachekey.examples_hash(warm)
    key = cachekey.key("stage1", **parts)
    if _done(run_dir / "result.json", key) and (run_dir / "checkpoint" / "config.json").is_file():
        return run_dir / "checkpoint"
    tokens = resolve_corpus(corpus).split("train") if cfg.mix_ratio > 0 else None
    ident = checkpoint_identity(model_cfg, meta, backbone)
    res = finetune(
        checkpoint.load(ckpt),
        checkpoint.load_tokenizer(ckpt),
        train,
        val,
        cfg,
        run_dir,
        tokens,
        progress=progress,
        meta={**ident, "stage": "stage1", "parent": str(ckpt), "corpus": corpus},
        warmup_examples=warm,
    )
    doc = {"key": key, "accuracy": res.accuracy, "steps": res.steps, "seconds": res.seconds}
    checkpoint.atomic_write_text(run_dir / "result.json", json.dumps(doc))
    return run_dir / "checkpoint"


def pruning_study(p) -> pd.DataFrame:
    """Every reference model and every (method, D) reduction of the base model, finetuned and evaluated per task.

    References: the base model itself (Z experts) and each variant of notebook 01 whose expert count is a target
    D (the equal-size models trained from scratch) or 1 (dense). Reductions reuse one calibration per task.
    A reduced model's router-only warm-up runs before its first training (stage 1 when p.stage1 is set, else the
    task finetune) on p.router_warmup_data: "task" (the task's training examples, the paper's A4) or
    "instructions" (the stage-1 instruction mix).
    """
    if isinstance(p.base_variant, list):  # several bases (e.g. switch-base-8 ... -128): one study each
        return _per_base_studies(p)
    out = Path(p.out_dir)
    store = results_store(out)
    base = find_checkpoint(out, p.base_variant, p.seed)
    cfg = FinetuneConfig.from_dict({**p.finetune, "seed": p.seed})
    refs = [base] + reference_checkpoints(out, p.reference_variants, p.seed)
    cfg1 = FinetuneConfig.from_dict({**p.stage1, "stage": "stage1", "seed": p.seed}) if p.stage1 else None
    if cfg1 is not None:  # the router warm-up of reduced models happens before stage 1, their first training
        cfg = cfg.replace(router_warmup_steps=0)
    instructions = None
    if p.router_warmup_data == INSTRUCTIONS and cfg1 is None:
        instructions = task_data(INSTRUCTIONS, p.corpus, None, "auto", p.max_train_examples, 1, p.seed)[0]

    jobs = []
    for task in p.tasks:
        train, val = task_data(task, p.corpus, None, "auto", p.max_train_examples, p.max_eval_examples, p.seed)
        spec = data_spec(task, p.corpus, p.max_train_examples, p.max_eval_examples, p.seed)
        task_part = dev_split(train, cfg.dev_fraction, cfg.dev_max_examples, cfg.seed)[0]  # never the dev split
        warm_task = task_part if p.router_warmup_data == "task" else None

        def staged(ckpt: Path) -> Path:
            if cfg1 is None:
                return ckpt
            return stage1_checkpoint(
                ckpt, cfg1, out, p.corpus, p.max_train_examples, p.backbone, p.progress, warmup_examples=warm_task
            )

        for ref in refs:
            jobs.append(dict(ckpt=staged(ref), task=task, train=train, val=val, spec=spec, extra=None, warmup=None))
        cal, cal_path = calibration_artifact(
            base,
            task,
            "train",
            out,
            max_examples=p.calibration_examples,
            batch_size=p.batch_size,
            corpus=p.corpus,
            seed=p.seed,
        )
        for method in p.methods:
            for d in p.targets:
                ckpt, rep = reduced_checkpoint(base, cal, cal_path, method, d, out, p.router, p.seed, p.workers)
                extra = {"reduce_seconds": rep["seconds"]["total"], "experts_per_layer": rep["num_experts"]}
                jobs.append(
                    dict(
                        ckpt=staged(ckpt), task=task, train=train, val=val, spec=spec, extra=extra, warmup=instructions
                    )
                )
    common = dict(cfg=cfg, out_dir=out, store=store, backbone=p.backbone, progress=p.progress)
    return pd.DataFrame(run_finetunes(jobs, common, p.finetune_workers))


def _finetune_job(job: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    return finetune_and_record(
        job["ckpt"], job["task"], job["train"], job["val"], common["cfg"], common["out_dir"], common["store"],
        common["backbone"], common["progress"], job["extra"], spec=job["spec"], warmup_examples=job["warmup"],
    )  # fmt: skip


def run_finetunes(jobs: list[dict[str, Any]], common: dict[str, Any], workers: int = 1) -> list[dict[str, Any]]:
    """finetune_and_record for every job (rows in job order). workers > 1: that many at once, each in a spawned
    process with cpu_count // workers threads (the store takes appends from several processes)."""
    if workers <= 1 or len(jobs) <= 1:
        return [_finetune_job(j, common) for j in jobs]
    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    progress_report(f"finetune {len(jobs)} models: {workers} at a time, {threads} thread(s) each")
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = [pool.submit(_finetune_job, j, common) for j in jobs]
        rows = []
        for i, f in enumerate(futures):
            rows.append(f.result())  # in job order; a worker's exception stops here
            name = checkpoint_name(Path(jobs[i]["ckpt"]))
            progress_report(
                f"finetune {i + 1}/{len(jobs)} done: {name} on {jobs[i]['task']} ({time.perf_counter() - t0:.0f}s)"
            )
    return rows


def _per_base_studies(p) -> pd.DataFrame:
    """pruning_study for each base of a list, each reduced only to the targets below its own expert count (a base
    without any is still finetuned as a reference); references finetuned once are reused from their run folders."""
    import copy

    frames = []
    for b in p.base_variant:
        z = max(checkpoint.read_config(find_checkpoint(p.out_dir, b, p.seed))[0].experts_per_layer or [1])
        q = copy.copy(p)  # p was validated; an empty target list only skips the reductions
        q.base_variant, q.targets = b, [d for d in p.targets if d < z]
        frames.append(pruning_study(q))
    return pd.concat(frames, ignore_index=True).drop_duplicates(subset=["run_dir"], ignore_index=True)


def task_baselines(tasks: list[str], corpus: str | None, max_train: int, max_eval: int, seed: int = 0) -> pd.DataFrame:
    """Chance and majority-class accuracy of each task's evaluation subset (the floor every model must clear)."""
    rows = []
    for task in tasks:
        train, val = task_data(task, corpus, None, "auto", max_train, max_eval, seed)
        rows.append(
            {
                "task": task,
                "n_train": len(train),
                "n_eval": len(val),
                "chance": chance_baseline(val),
                "majority": majority_baseline(train, val),
            }
        )
    return pd.DataFrame(rows)
