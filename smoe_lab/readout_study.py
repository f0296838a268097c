"""Notebook 03's low-noise readouts (smoe_lab.readouts) for every reduction of the base model, into the results store.

For each domain of `readout_domains`: the base model is calibrated on the domain's held-out documents, reduced with
every method to every target D with router `readout_router` (merge or keep: no training after the reduction), and
each reduced model, the unreduced base, and the reference models of notebook 01 (the scratch model with D experts,
dense) get their LM loss on the domain's validation stream; each reduced model also gets its per-layer output
reconstruction error on the calibration tokens. Results-store rows: task "corpus:val_<domain>", stage "zeroshot",
metrics "lm_loss", "drop_frac" and (reduced models) "recon_routed", "recon_mapped" (mean over MoE layers; the
per-layer values in extra). A model already measured under the same cache key (`smoe_lab.cachekey`: the package
source, the checkpoint's weights, the corpus's content, the settings) is not measured again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from . import cachekey, checkpoint
from .data.corpus import resolve_corpus
from .experiments import (
    calibration_artifact,
    calibration_batches_for,
    find_checkpoint,
    pretrain_dir,
    reduced_checkpoint,
    results_store,
)
from .readouts import domain_lm_loss, layer_reconstruction
from .results import checkpoint_identity

STAGE = "zeroshot"


def readout_task(domain: str) -> str:
    return f"corpus:val_{domain}"


def _name(ckpt: Path) -> str:
    return ckpt.parent.name if ckpt.name == "checkpoint" else ckpt.name


def readout_study(p) -> pd.DataFrame:
    """Zero-shot domain LM loss and layer reconstruction of every (method, D) reduction (p: PruningNotebook)."""
    out = Path(p.out_dir)
    store = results_store(out)
    done = set(store.rows(stage=STAGE)["config_hash"].dropna())
    corpus = resolve_corpus(p.corpus)
    base = find_checkpoint(out, p.base_variant, p.seed)
    refs = [base] + [
        pretrain_dir(out, v, p.seed) / "checkpoint"
        for v in p.reference_variants
        if (pretrain_dir(out, v, p.seed) / "checkpoint" / "config.json").is_file()
    ]
    val_key = cachekey.corpus_key(corpus.path)
    settings = {"windows": p.readout_eval_windows, "cal_tokens": p.readout_calibration_tokens, "bs": p.batch_size}
    rows: list[dict[str, Any]] = []
    for domain in p.readout_domains:
        tokens = corpus.split(f"val_{domain}")
        source = f"heldout:{domain}"
        cal_kw = dict(batch_size=p.batch_size, corpus=p.corpus, seed=p.seed, max_tokens=p.readout_calibration_tokens)
        cal, cal_path = calibration_artifact(base, source, "heldout", out, **cal_kw)
        batches = None
        base_model = None
        jobs = [(ref, None) for ref in refs] + [(m, d) for m in p.methods for d in p.targets]
        for job, d in jobs:
            if d is None:
                ckpt = job
            else:
                ckpt, _ = reduced_checkpoint(base, cal, cal_path, job, d, out, p.readout_router, p.seed, p.workers)
            model_cfg, meta = checkpoint.read_config(ckpt)
            ident = checkpoint_identity(model_cfg, meta, p.backbone)
            # the folder name is part of the key: two methods can produce identical weights
            key = cachekey.key(
                "readout",
                ckpt=checkpoint.checkpoint_hash(ckpt),
                name=_name(ckpt),
                domain=domain,
                val=val_key,
                **settings,
            )
            row = {**ident, "domain": domain, "model": _name(ckpt), "router": p.readout_router if d else ""}
            if key in done:
                prev = store.rows(stage=STAGE, config_hash=key)
                row.update({m: v for m, v in zip(prev["metric"], prev["value"])})
                rows.append(row)
                continue
            model = checkpoint.load(ckpt)
            loss = domain_lm_loss(model, tokens, p.batch_size, p.readout_eval_windows)
            row.update(lm_loss=loss["loss"], drop_frac=loss["drop_frac"])
            extra: dict[str, Any] = {"eval_tokens": loss["tokens"], "router": row["router"], **settings}
            if d is not None:
                if base_model is None:
                    base_model = checkpoint.load(base)
                    batches = calibration_batches_for(base, source, "heldout", None, **cal_kw)
                recon = layer_reconstruction(base_model, model, batches)
                row["recon_routed"] = sum(r["routed"] for r in recon) / len(recon)
                row["recon_mapped"] = sum(r["mapped"] for r in recon) / len(recon)
                extra["recon_routed_layers"] = [round(r["routed"], 6) for r in recon]
                extra["recon_mapped_layers"] = [round(r["mapped"], 6) for r in recon]
            metrics = [k for k in ("lm_loss", "drop_frac", "recon_routed", "recon_mapped") if k in row]
            common = {**ident, "task": readout_task(domain), "stage": STAGE, "seed": p.seed, "config_hash": key}
            store.append_many([{**common, "metric": m, "value": float(row[m]), "extra": extra} for m in metrics])
            done.add(key)
            rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        base_loss = df[df["method"].eq("none") & df["z"].eq(df["z"].max())].set_index("domain")["lm_loss"]
        df["vs_base"] = df["lm_loss"] - df["domain"].map(base_loss)
    return df
