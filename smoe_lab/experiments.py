"""Notebook-level stages: each notebook cell calls one of these and draws what it returns.

Stages are idempotent: a result whose cache key (`smoe_lab.cachekey`: the package source, the data's content and
every setting) matches the one stored beside it is reused, so `smoe-lab run` skips work that is up to date and an
interrupted run resumes. Keys: a pretrained variant (`train.pretrain_key`), a calibration artifact (the batches'
content + the checkpoint's hash), a reduced checkpoint (base hash, calibration key, method, D, router, seed), a
finetuning (checkpoint hash, config, the examples' content).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import cachekey, checkpoint
from .notebook_params import PretrainNotebook
from .progress import report as progress_report
from .progress import stage as progress_stage
from .readouts import domain_calibration_batches
from .router_health import last_health, specialisation_warning
from .train import pretrain, pretrain_key, read_metrics, resolve_corpus


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
    import os

    import torch

    from . import progress

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
    import multiprocessing
    import os
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

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


# -- 02: calibration + clusters ------------------------------------------------------------------------------------
def pretrain_dir(out_dir: str | Path, variant: str, seed: int = 0) -> Path:
    """Run folder of a pretrained variant ('dense', '8e', ...) made by notebook 01."""
    return Path(out_dir) / "pretrain" / f"{variant}-s{seed}"


def find_checkpoint(out_dir: str | Path, variant: str, seed: int = 0) -> Path:
    """A checkpoint folder: `variant` may be a path, a Hugging Face folder or hub id (smoe_lab.hf; resolved to its
    local folder), or a variant label of notebook 01's runs under out_dir."""
    from .hf.source import is_hf_source, resolve

    p = Path(variant)
    if (p / "config.json").is_file():
        return p
    if is_hf_source(variant):
        return resolve(variant)
    ck = pretrain_dir(out_dir, variant, seed) / "checkpoint"
    if not (ck / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint for variant {variant!r} at {ck}: run notebook 01 with it first")
    return ck


def reference_checkpoints(out_dir: str | Path, variants: list[str], seed: int = 0) -> list[Path]:
    """The checkpoints of notebook 01's variants that exist under out_dir, and every checkpoint folder or Hugging
    Face model named in `variants` (those must exist)."""
    from .hf.source import is_hf_source

    found = []
    for v in variants:
        ck = pretrain_dir(out_dir, v, seed) / "checkpoint"
        if (ck / "config.json").is_file():
            found.append(ck)
        elif (Path(v) / "config.json").is_file() or is_hf_source(v):
            found.append(find_checkpoint(out_dir, v, seed))
    return found


def checkpoint_name(ckpt: str | Path) -> str:
    """The run-folder name of a checkpoint: its run's folder for out/<run>/checkpoint, a hub snapshot's repo
    ('google--switch-base-8'), else the folder's own name."""
    from .hf.source import checkpoint_name as _name

    return _name(ckpt)


def variant_tag(variant: str) -> str:
    """A file-name-safe tag of a variant label, checkpoint path or hub id (for figure and table names)."""
    p = Path(variant)
    return checkpoint_name(p) if len(p.parts) > 1 else str(variant)


def calibration_batches_for(
    ckpt: str | Path,
    source: str,
    split: str,
    max_examples: int | None,
    batch_size: int,
    corpus: str | None = None,
    seed: int = 0,
    max_tokens: int | None = None,
):
    """Calibration batches from a task ('boolq', 'cloze-news', ...), from corpus text ('corpus:val_news'), or from a
    domain's held-out documents ('heldout:news', in neither train nor val: `readouts.domain_calibration_batches`)."""
    from .checkpoint import load_tokenizer, read_config

    cfg, _ = read_config(ckpt)
    block = cfg.block_size
    if source.startswith("corpus:") and getattr(cfg, "family", None):
        raise ValueError(f"{source}: corpus windows are ids of smoe_lab's tokenizer; calibrate {ckpt} on a task")
    if source.startswith("heldout:"):
        if not corpus:
            raise ValueError(f"calibration source {source!r} needs a corpus")
        domain = source.split(":", 1)[1]
        return domain_calibration_batches(resolve_corpus(corpus), domain, batch_size, block, max_tokens)
    if source.startswith("corpus:"):
        from .data.corpus import iter_eval_batches

        if not corpus:
            raise ValueError(
                f"calibration source {source!r} reads corpus text: pass corpus=<recipe or prepared folder>"
            )
        tokens = resolve_corpus(corpus).split(source.split(":", 1)[1])
        limit = None if not max_tokens else max(1, max_tokens // (batch_size * block))
        return [x for x, _ in iter_eval_batches(tokens, batch_size, block, max_batches=limit)]
    from .data.tasks import calibration_batches, load_task

    examples = load_task(source, split, max_examples=max_examples, seed=seed, corpus=corpus)
    return calibration_batches(load_tokenizer(ckpt), examples, batch_size, block, max_tokens=max_tokens)


def calibration_artifact(
    ckpt: str | Path,
    source: str,
    split: str,
    out_dir: str | Path,
    max_examples: int | None = None,
    batch_size: int = 16,
    corpus: str | None = None,
    seed: int = 0,
    max_tokens: int | None = None,
    progress: bool = False,
):
    """The calibration artifact of (checkpoint, task, split), made once and reused by every method and D.

    Reused when its cache key matches: the package source, the checkpoint's weights and the calibration batches'
    content (examples, tokenizer, block size, batch size, max_tokens all show in it), the seed."""
    from .calibrate import Calibration, calibrate
    from .checkpoint import checkpoint_hash, load

    ckpt = Path(ckpt)
    tag = f"{checkpoint_name(ckpt)}-{source.replace(':', '_')}-{split}-n{max_examples or 'all'}"
    path = Path(out_dir) / "calibration" / f"{tag}.safetensors"
    h = checkpoint_hash(ckpt)
    batches = calibration_batches_for(ckpt, source, split, max_examples, batch_size, corpus, seed, max_tokens)
    key = cachekey.key("calibration", checkpoint=h, batches=cachekey.tensors_hash(batches), seed=seed)
    if path.is_file():
        try:
            cal = Calibration.load(path)
        except ValueError:
            cal = None  # unreadable: make it again
        if cal is not None and cal.manifest.get("cache_key") == key:
            return cal, path
    model = load(ckpt)
    progress_report(f"calibrate {checkpoint_name(ckpt)} on {source}/{split}")
    cal = calibrate(
        model,
        batches,
        seed=seed,
        progress=progress,
        checkpoint_hash=h,
        checkpoint=str(ckpt),
        task=source,
        split=split,
        max_examples=max_examples,
        max_tokens=max_tokens,
        batch_size=batch_size,
        cache_key=key,
    )
    cal.save(path)
    return cal, path


def cluster_summary(explorer, D: int, methods: list[str], stability_seeds: list[int]) -> pd.DataFrame:
    """One row per (MoE layer, method): group sizes, share of tokens on the centres, spectral diagnostics."""
    stab = explorer.stability(D, tuple(stability_seeds))
    rows = []
    for layer in range(explorer.num_layers):
        for method in methods:
            v = explorer.view(layer, min(D, explorer.experts_per_layer[layer]), method)
            sizes = np.bincount(v.labels[v.labels >= 0], minlength=v.D)
            rows.append(
                {
                    "layer": layer,
                    "method": method,
                    "Z": len(v.labels),
                    "D": v.D,
                    "group_sizes": " ".join(map(str, sorted(sizes.tolist(), reverse=True))),
                    "centre_token_share": round(float(v.frequencies[v.centres].sum()), 4),
                    "eigengap": round(v.eigengap, 4),
                    "silhouette": round(v.silhouette, 4),
                    "largest_gap_D": v.suggested_D,
                    "uncurl_stability_ari": round(stab[layer], 4),
                    "router_entropy_ratio": round(explorer.health(layer).entropy_ratio, 4),
                    "router_top1_gate": round(explorer.health(layer).top1_gate, 4),
                }
            )
    return pd.DataFrame(rows)


# -- 03: reduce + finetune + evaluate ------------------------------------------------------------------------------
def results_store(out_dir: str | Path):
    from .results import ResultsStore

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
    from .reduce.methods import reduce_model

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
    from .finetune import finetune, store_rows
    from .results import checkpoint_identity

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
    from .finetune import INSTRUCTIONS, finetune, task_data
    from .results import checkpoint_identity

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
    from .finetune import INSTRUCTIONS, FinetuneConfig, data_spec, task_data
    from .protocol import dev_split

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
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

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
    from .evaluate import chance_baseline, majority_baseline
    from .finetune import task_data

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


# -- 04: tables, inference cost ------------------------------------------------------------------------------------
def pretrained_variants(out_dir: str | Path, seed: int = 0) -> list[str]:
    """Variant labels with a finished notebook-01 run under out_dir (dense first, then by expert count)."""
    root = Path(out_dir) / "pretrain"
    found = [p.name.rsplit("-s", 1)[0] for p in root.glob(f"*-s{seed}") if (p / "checkpoint" / "config.json").is_file()]
    return sorted(found, key=lambda v: 1 if v == "dense" else int(v.rstrip("e")))


def pretrain_runs(out_dir: str | Path, seed: int = 0) -> pd.DataFrame:
    """One summary row (summarize_run) per finished notebook-01 variant under out_dir."""
    return pd.DataFrame([summarize_run(pretrain_dir(out_dir, v, seed)) for v in pretrained_variants(out_dir, seed)])


def inference_profile(
    out_dir: str | Path,
    variants: list[str],
    seed: int = 0,
    batch_size: int = 1,
    seq_len: int | None = None,
    reps: int = 10,
) -> pd.DataFrame:
    """Per pretrained variant: validation loss (notebook 01), forward latency, and the MoE layer's time split."""
    import torch

    from .profile import model_latency, moe_layer_breakdown

    rows = []
    for v in variants:
        progress_report(f"latency of {v}: batch {batch_size}, {reps} timings")
        ckpt = find_checkpoint(out_dir, v, seed)
        model = checkpoint.load(ckpt)
        run = summarize_run(pretrain_dir(out_dir, v, seed))
        lat = model_latency(model, batch_size, seq_len, reps)
        row = {
            "model": v,
            "experts": max(model.config.experts_per_layer or [1]),
            "params": run["params"],
            "active_params": run["active_params"],
            "val_loss": run["val_loss"],
            **lat,
        }
        layers = model.moe_layers()
        if layers:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(lat["batch_size"] * lat["seq_len"], model.config.d_model, generator=g)
            parts = moe_layer_breakdown(layers[0], x, reps, spread=True)
            for k in [k for k in parts if not k.endswith(("_q25", "_q75"))]:  # median, then its quartiles
                row.update({f"moe_{k}_ms{q}": round(parts[k + q], 4) for q in ("", "_q25", "_q75")})
        rows.append(row)
    return pd.DataFrame(rows)


TABLES = {
    "table1_greedy_pruning": ["freq_prune"],
    "table2_uncurl": ["uncurl"],
    "table3_frequency_merge": ["uncurl", "freq_merge"],
    "table4_mcsmoe": ["uncurl", "mcsmoe"],
    "table5_hybrid": ["uncurl", "hybrid", "freq_prune"],
}


def paper_tables(out_dir: str | Path, tasks: list[str] | None = None, tables: dict[str, list[str]] | None = None):
    """The paper's Tables 1-4 (+ the hybrid) from the results store: name -> AccuracyTable; CSV + Markdown saved."""
    from .results import accuracy_table

    store = results_store(out_dir)
    df = store.rows(metric="accuracy")
    if df.empty:
        raise ValueError(f"the results store {store.path} holds no accuracy rows: run notebook 03 first")
    tasks = tasks or sorted(df["task"].unique())
    out = {}
    for name, methods in (tables or TABLES).items():
        present = [m for m in methods if m in set(df["method"])]
        if not present:
            continue
        t = accuracy_table(df, tasks, methods=present)
        save_table(t.to_frame(), out_dir, name, markdown=t.to_markdown())
        out[name] = t
    return out
