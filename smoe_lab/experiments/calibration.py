"""Notebook 02's stages: find checkpoints, calibration batches and the cached calibration artifact, cluster
summaries.
Re-exported by smoe_lab.experiments (see its docstring for the caching rule)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import cachekey
from ..calibrate import Calibration, calibrate
from ..checkpoint import checkpoint_hash, load, load_tokenizer, read_config
from ..data.corpus import iter_eval_batches, resolve_corpus
from ..data.tasks import calibration_batches, load_task
from ..hf.source import checkpoint_name as _name
from ..hf.source import is_hf_source, resolve
from ..progress import report as progress_report
from ..readouts import domain_calibration_batches


# -- 02: calibration + clusters ------------------------------------------------------------------------------------
def pretrain_dir(out_dir: str | Path, variant: str, seed: int = 0) -> Path:
    """Run folder of a pretrained variant ('dense', '8e', ...) made by notebook 01."""
    return Path(out_dir) / "pretrain" / f"{variant}-s{seed}"


def find_checkpoint(out_dir: str | Path, variant: str, seed: int = 0) -> Path:
    """A checkpoint folder: `variant` may be a path, a Hugging Face folder or hub id (smoe_lab.hf; resolved to its
    local folder), or a variant label of notebook 01's runs under out_dir."""
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
        if not corpus:
            raise ValueError(
                f"calibration source {source!r} reads corpus text: pass corpus=<recipe or prepared folder>"
            )
        tokens = resolve_corpus(corpus).split(source.split(":", 1)[1])
        limit = None if not max_tokens else max(1, max_tokens // (batch_size * block))
        return [x for x, _ in iter_eval_batches(tokens, batch_size, block, max_batches=limit)]

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
