"""Notebook-level stages: each notebook cell calls one of these and draws what it returns.

Stages are idempotent: a variant whose finished checkpoint exists with the same model and training config is
not retrained (so `smoe-lab run` can skip work that is up to date, and an interrupted run resumes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import checkpoint
from .notebook_params import PretrainNotebook
from .readouts import domain_calibration_batches
from .router_health import last_health, specialisation_warning
from .train import pretrain, read_metrics


def variant_label(num_experts: int) -> str:
    return "dense" if num_experts == 1 else f"{num_experts}e"


def _finished(run_dir: Path, model_cfg, train_cfg) -> bool:
    """True when run_dir holds a checkpoint at the last step made with exactly these configs."""
    try:
        cfg, meta = checkpoint.read_config(run_dir / "checkpoint")
    except FileNotFoundError:
        return False
    return (
        cfg == model_cfg and meta.get("train_config") == train_cfg.to_dict() and meta.get("step") == train_cfg.max_steps
    )


def _partial(run_dir: Path, model_cfg, train_cfg) -> bool:
    """A checkpoint of the same configs that stopped early: resume it instead of starting again."""
    try:
        cfg, meta = checkpoint.read_config(run_dir / "checkpoint")
    except FileNotFoundError:
        return False
    same = cfg == model_cfg and meta.get("train_config") == train_cfg.to_dict()
    return same and checkpoint.load_train_state(run_dir / "checkpoint") is not None


def pretrain_variants(p: PretrainNotebook) -> pd.DataFrame:
    """Pretrain every variant on the same token budget; returns one row per model (the notebook's table)."""
    train_cfg = p.train_config()
    rows = []
    for e in p.variants:
        model_cfg = p.model_config(e)
        run_dir = Path(p.out_dir) / "pretrain" / f"{variant_label(e)}-s{p.seed}"
        if _finished(run_dir, model_cfg, train_cfg):
            print(f"{variant_label(e)}: up to date ({run_dir})")
        else:
            resume = _partial(run_dir, model_cfg, train_cfg)
            pretrain(model_cfg, train_cfg, p.corpus, run_dir, resume=resume, progress=p.progress)
        rows.append(summarize_run(run_dir))
    table = pd.DataFrame(rows)
    return table


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
    """A checkpoint folder: `variant` may be a path, or a variant label of notebook 01's runs under out_dir."""
    p = Path(variant)
    if (p / "config.json").is_file():
        return p
    ck = pretrain_dir(out_dir, variant, seed) / "checkpoint"
    if not (ck / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint for variant {variant!r} at {ck}: run notebook 01 with it first")
    return ck


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
    if source.startswith("heldout:"):
        from .train import resolve_corpus

        if not corpus:
            raise ValueError(f"calibration source {source!r} needs a corpus")
        domain = source.split(":", 1)[1]
        return domain_calibration_batches(resolve_corpus(corpus), domain, batch_size, block, max_tokens)
    if source.startswith("corpus:"):
        from .data.corpus import iter_eval_batches, open_corpus
        from .train import resolve_corpus

        tokens = (resolve_corpus(corpus) if corpus else open_corpus("tiny")).split(source.split(":", 1)[1])
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
    """The calibration artifact of (checkpoint, task, split), made once and reused by every method and D."""
    from .calibrate import Calibration, calibrate
    from .checkpoint import checkpoint_hash, load

    ckpt = Path(ckpt)
    tag = f"{ckpt.parent.name}-{source.replace(':', '_')}-{split}-n{max_examples or 'all'}"
    path = Path(out_dir) / "calibration" / f"{tag}.safetensors"
    h = checkpoint_hash(ckpt)
    if path.is_file():
        cal = Calibration.load(path)
        has_health = all(s.entropy_sum == s.entropy_sum for s in cal.layers)  # nan: made before router health
        if cal.manifest.get("checkpoint_hash") == h and cal.manifest.get("max_tokens") == max_tokens and has_health:
            return cal, path
    model = load(ckpt)
    batches = calibration_batches_for(ckpt, source, split, max_examples, batch_size, corpus, seed, max_tokens)
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
    """A finished step's saved result when it was made with the same settings (key), else None."""
    if path.is_file():
        doc = json.loads(path.read_text())
        if doc.get("key") == key:
            return doc
    return None


def reduced_checkpoint(
    base_ckpt: Path, cal, cal_path: Path, method: str, d: int, out_dir: Path, router: str, seed: int, workers: int
) -> tuple[Path, dict[str, Any]]:
    """Reduce once per (base, calibration, method, D, router, seed); the reduced checkpoint is reused."""
    from .reduce.methods import reduce_model

    dest = out_dir / "reduced" / f"{cal_path.stem}-{method}-D{d}-{router}-s{seed}"  # stem names base + task
    key = f"{checkpoint.checkpoint_hash(base_ckpt)}:{cal_path.name}:{method}:{d}:{router}:{seed}"
    done = _done(dest.parent / f"{dest.name}.json", key)
    if done and (dest / "config.json").is_file():
        return dest, done["report"]
    model = checkpoint.load(base_ckpt)
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
) -> dict[str, Any]:
    """Finetune a checkpoint on a task (skipped when done with the same settings); rows into the results store."""
    from .finetune import finetune
    from .results import checkpoint_identity, config_hash

    model_cfg, meta = checkpoint.read_config(ckpt)
    ident = checkpoint_identity(model_cfg, meta, backbone)
    name = ckpt.parent.name if ckpt.name == "checkpoint" else ckpt.name  # pretrain run folder, or reduced name
    run_dir = out_dir / "finetune" / task / name
    key = config_hash({"ckpt": checkpoint.checkpoint_hash(ckpt), "cfg": cfg.to_dict(), "n": [len(train), len(val)]})
    done = _done(run_dir / "result.json", key)
    if done:
        return done["row"]
    model = checkpoint.load(ckpt)
    tok = checkpoint.load_tokenizer(ckpt)
    res = finetune(model, tok, train, val, cfg, run_dir, progress=progress, meta={**ident, "task": task})
    row = {
        **ident,
        "task": task,
        "stage": cfg.stage,
        "seed": cfg.seed,
        "accuracy": res.best_accuracy,
        "final_accuracy": res.final_accuracy,
        "val_loss": res.final_val_loss,
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
        "config_hash": key,
        "seconds": res.seconds,
        "extra": extra or {},
    }
    store.append_many(
        [
            {**common, "metric": "accuracy", "value": res.best_accuracy},
            {**common, "metric": "val_loss", "value": res.final_val_loss},
        ]
    )
    checkpoint.atomic_write_text(run_dir / "result.json", json.dumps({"key": key, "row": row}, default=str))
    return row


def stage1_checkpoint(
    ckpt: Path, cfg, out_dir: Path, corpus: str | None, max_examples: int, backbone: str, progress: bool
) -> Path:
    """Stage 1 of the paper's finetuning (instruction mix + pretraining windows at cfg.mix_ratio), once per model.

    Runs before the task finetune; for a reduced model it is the first training after reduction, so the router-only
    warm-up happens here. Returns the stage-1 checkpoint (skipped when done with the same settings).
    """
    from .finetune import INSTRUCTIONS, finetune, task_data
    from .results import checkpoint_identity, config_hash
    from .train import resolve_corpus

    name = ckpt.parent.name if ckpt.name == "checkpoint" else ckpt.name
    run_dir = out_dir / "stage1" / name
    key = config_hash({"ckpt": checkpoint.checkpoint_hash(ckpt), "cfg": cfg.to_dict(), "n": max_examples})
    if _done(run_dir / "result.json", key) and (run_dir / "checkpoint" / "config.json").is_file():
        return run_dir / "checkpoint"
    model_cfg, meta = checkpoint.read_config(ckpt)
    train, val = task_data(INSTRUCTIONS, corpus, None, "auto", max_examples, max(1, max_examples // 4), cfg.seed)
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
    )
    doc = {"key": key, "accuracy": res.final_accuracy, "steps": res.steps, "seconds": res.seconds}
    checkpoint.atomic_write_text(run_dir / "result.json", json.dumps(doc))
    return run_dir / "checkpoint"


def pruning_study(p) -> pd.DataFrame:
    """Every reference model and every (method, D) reduction of the base model, finetuned and evaluated per task.

    References: the base model itself (Z experts) and each variant of notebook 01 whose expert count is a target
    D (the equal-size models trained from scratch) or 1 (dense). Reductions reuse one calibration per task.
    """
    from .finetune import FinetuneConfig, task_data

    out = Path(p.out_dir)
    store = results_store(out)
    base = find_checkpoint(out, p.base_variant, p.seed)
    cfg = FinetuneConfig.from_dict({**p.finetune, "seed": p.seed})
    refs = [base] + [
        pretrain_dir(out, v, p.seed) / "checkpoint"
        for v in p.reference_variants
        if (pretrain_dir(out, v, p.seed) / "checkpoint" / "config.json").is_file()
    ]
    cfg1 = FinetuneConfig.from_dict({**p.stage1, "stage": "stage1", "seed": p.seed}) if p.stage1 else None
    if cfg1 is not None:  # the router warm-up of reduced models happens in stage 1, their first training
        cfg = cfg.replace(router_warmup_steps=0)

    def staged(ckpt: Path) -> Path:
        if cfg1 is None:
            return ckpt
        return stage1_checkpoint(ckpt, cfg1, out, p.corpus, p.max_train_examples, p.backbone, p.progress)

    rows = []
    for task in p.tasks:
        train, val = task_data(task, p.corpus, None, "auto", p.max_train_examples, p.max_eval_examples, p.seed)
        for ref in refs:
            rows.append(finetune_and_record(staged(ref), task, train, val, cfg, out, store, p.backbone, p.progress))
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
                row = finetune_and_record(
                    staged(ckpt), task, train, val, cfg, out, store, p.backbone, p.progress, extra
                )
                rows.append(row)
    return pd.DataFrame(rows)


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
            parts = moe_layer_breakdown(layers[0], x, reps)
            row.update({f"moe_{k}_ms": round(t, 4) for k, t in parts.items()})
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
