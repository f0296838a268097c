"""Finetuning (paper Sec 4.1 and appendix A4): stage 1 on an instruction mix plus pretraining text, stage 2 on one
task's train split; for reduced models a router-only warm-up first.

Everything goes through `smoe_lab.train.fit` (AdamW, linear warmup/decay, clipping, accumulation, atomic
checkpoints, exact resume, metrics.jsonl). What this module adds:

- `FinetuneConfig`: validated settings, paper values in `FinetuneConfig.paper()` (Table 8).
- The data: text-to-text examples encoded without packing (`smoe_lab.data.tasks`), loss on the answer tokens only;
  in stage 1 a fraction `mix_ratio` of micro-batches are pretraining LM windows (against forgetting).
- `router_warmup`: freeze everything but the MoE routers, train them for a few steps on the task batches, unfreeze
  (the same step loop as `fit`; its rows, with the gradient norm and router telemetry, in out_dir/router_warmup.jsonl).
  The paper does this after pruning because the reduced model's routers are re-initialised (appendix A4: "on the
  task data"; `warmup_examples` lets a caller warm up on other data, e.g. the stage-1 instruction mix).
- The protocol (`smoe_lab.protocol`): a seeded dev split is carved out of the train examples (whole passages or
  documents move); the model trains on the rest. After every evaluation (on the dev split), `fit`'s on_eval hook
  saves the model (with its tokenizer) to out_dir/best when the dev accuracy is strictly higher than every earlier
  one. At the end the selected checkpoint (out_dir/best, read back from disk) is measured ONCE on the validation
  examples: the reported accuracy, acc_norm and loss, all from that one checkpoint. out_dir/checkpoint is the final
  state (with train state, for resume); out_dir/finetune.json summarises the run.
- Schedules: an explicit `steps` shorter than `warmup_steps` is refused; when the steps are derived from `epochs`
  (the paper's 500 warmup steps and 50 epochs give CB only 196 steps) the warmup is clamped to the run's length
  with a logged warning, so the peak learning rate is reached.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint
from .data.corpus import get_batch, resolve_corpus
from .data.tasks import Example, TaskBatches, encode_for_training, instruction_mix, load_flan, load_task
from .evaluate import evaluate_task
from .finetune_config import ROUTER_WARMUP_ON, STAGES, FinetuneConfig  # noqa: F401  (re-exported)
from .loop import Batch
from .protocol import DEV_SPLIT, REPORT_SPLIT, EvalSpec, dev_split, metric_rows
from .results import checkpoint_identity
from .router_warmup import only_routers_trainable, router_parameters, router_warmup  # noqa: F401
from .train import fit, resolve_device

INSTRUCTIONS = "instructions"  # the task name of the stage-1 instruction mix


# ---------------------------------------------------------------------------------------------------------------
# Stage-1 data: instructions mixed with pretraining windows
# ---------------------------------------------------------------------------------------------------------------


class MixedBatches:
    """next_batch() for stage 1: micro-batch j is a pretraining LM window batch when floor((j+1) r) > floor(j r)
    (r = mix_ratio as an exact fraction), else the next task batch. So exactly floor(n r) of the first n
    micro-batches are LM batches, evenly spread; the choice depends on j only, and LM windows are drawn with
    `generator` (checkpointed by fit), so `skip` + fit's resume reproduce an interrupted run exactly."""

    def __init__(
        self, tasks: TaskBatches, tokens: np.ndarray, mix_ratio: float, block_size: int, generator: torch.Generator
    ):
        if len(tokens) < block_size + 1:
            raise ValueError(f"pretraining stream of {len(tokens)} tokens is too short for block_size {block_size}")
        self.tasks, self.tokens, self.block_size, self.generator = tasks, tokens, block_size, generator
        self.ratio = Fraction(mix_ratio).limit_denominator(10_000)
        self.count = 0

    def lm_before(self, j: int) -> int:
        """Number of LM micro-batches among the first j."""
        return j * self.ratio.numerator // self.ratio.denominator

    def skip(self, k: int) -> None:
        self.tasks.skip(k - (self.lm_before(self.count + k) - self.lm_before(self.count)))
        self.count += k

    def __call__(self) -> Batch:
        j = self.count
        self.count += 1
        if self.lm_before(j + 1) > self.lm_before(j):
            x, y = get_batch(self.tokens, self.tasks.batch_size, self.block_size, self.generator)
            return x, y, torch.ones_like(x, dtype=torch.bool)
        return self.tasks()


# ---------------------------------------------------------------------------------------------------------------
# Finetuning
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """What a finetuning run measured. The reported numbers (accuracy, acc_norm, loss) come from the selected
    checkpoint (best_checkpoint, chosen on the dev split at best_step) measured once on the validation examples;
    dev_* are that checkpoint's selection numbers, final_dev_* the last step's."""

    accuracy: float
    acc_norm: float
    loss: float
    n_report: int
    dev_accuracy: float
    dev_acc_norm: float
    dev_loss: float
    best_step: int
    final_dev_accuracy: float
    final_dev_loss: float
    final_train_loss: float
    steps: int
    seconds: float
    best_checkpoint: str
    checkpoint: str | None
    metrics: str | None
    n_train: int = 0
    n_dev: int = 0
    router_warmup: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation: step, dev_*
    top_pred_share: float = math.nan  # share of the most frequent answer on the validation split (1 = one class)

    @property
    def report(self) -> dict[str, float]:
        """The reported numbers in evaluate_task's keys (for `smoe_lab.protocol.metric_rows`)."""
        return {"accuracy": self.accuracy, "acc_norm": self.acc_norm, "loss": self.loss}

    @property
    def selection(self) -> dict[str, float]:
        """The selected checkpoint's dev numbers in evaluate_task's keys."""
        return {"accuracy": self.dev_accuracy, "acc_norm": self.dev_acc_norm, "loss": self.dev_loss}


def store_rows(res: FinetuneResult, common: dict[str, Any]) -> list[dict[str, Any]]:
    """Results-store rows of a finetuning: the reported numbers under "accuracy", "acc_norm", "loss" (validation
    split, selected checkpoint) and the selection numbers under "dev_accuracy", "dev_acc_norm", "dev_loss"."""
    info = {"best_step": res.best_step, "n_report": res.n_report, "n_dev": res.n_dev, "n_train": res.n_train}
    info["top_pred_share"] = res.top_pred_share
    common = {**common, "extra": {**(common.get("extra") or {}), **info, "checkpoint": res.best_checkpoint}}
    return metric_rows(common, res.report, REPORT_SPLIT) + metric_rows(common, res.selection, DEV_SPLIT)


def _check_inputs(model, tok, train_examples, val_examples, cfg: FinetuneConfig, pretrain_tokens) -> int:
    """The sequence length to use; ValueError on anything inconsistent."""
    block = cfg.block_size or model.config.block_size
    if block > model.config.block_size:
        raise ValueError(f"FinetuneConfig.block_size: {block} exceeds the model's block_size {model.config.block_size}")
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model's vocab_size is {model.config.vocab_size}")
    if not train_examples:
        raise ValueError("finetune: no training examples")
    if not val_examples:
        raise ValueError("finetune: no validation examples")
    if cfg.stage == "stage1" and cfg.mix_ratio > 0 and pretrain_tokens is None:
        raise ValueError(f"FinetuneConfig.mix_ratio: {cfg.mix_ratio} needs pretrain_tokens (a corpus train stream)")
    if cfg.stage == "stage1" and cfg.mix_ratio > 0 and getattr(model, "hf_family", None) is not None:
        raise ValueError(
            f"FinetuneConfig.mix_ratio: {cfg.mix_ratio}: pretraining windows are ids of smoe_lab's corpus tokenizer, "
            "a Hugging Face model has its own; use mix_ratio 0 (instruction mix only)"
        )
    if cfg.stage == "stage2" and pretrain_tokens is not None:
        raise ValueError("finetune: stage2 trains on the task alone; pass pretrain_tokens only in stage1")
    return block


def _previous_best(path: Path) -> tuple[float, int]:
    if not (path / checkpoint.CONFIG).is_file():
        return -math.inf, 0
    meta = checkpoint.read_config(path)[1]
    return float(meta.get("dev_accuracy", -math.inf)), int(meta.get("step", 0))


def finetune(
    model,
    tok,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    cfg: FinetuneConfig,
    out_dir: str | Path,
    pretrain_tokens: np.ndarray | None = None,
    progress: bool = True,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    warmup_examples: Sequence[Example] | None = None,
    data_spec: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Finetune `model` in place on train_examples and report on val_examples; see the module docstring.

    The dev split is carved from train_examples (cfg.dev_fraction, cfg.dev_max_examples, cfg.seed); the model
    trains on the rest for cfg.total_steps(len(rest)) steps, after an optional router-only warm-up (not repeated
    on resume) on warmup_examples (default: the training part). Writes out_dir/checkpoint (final), out_dir/best
    (best dev accuracy; strictly higher replaces it), out_dir/metrics.jsonl and out_dir/finetune.json.
    pretrain_tokens: a corpus "train" stream for stage 1's LM micro-batches. meta: extra fields stored in both
    checkpoints (e.g. base_model, method, z, d). data_spec: how the examples were loaded (task, max_train_examples,
    max_eval_examples, seed, corpus, root, source); with it the best checkpoint carries an `EvalSpec`, so
    `smoe-lab evaluate` on it reproduces the reported numbers.
    """
    block = _check_inputs(model, tok, train_examples, val_examples, cfg, pretrain_tokens)
    train_part, dev = dev_split(list(train_examples), cfg.dev_fraction, cfg.dev_max_examples, cfg.seed)
    steps = cfg.total_steps(len(train_part))
    tcfg = cfg.train_config(steps)
    device = resolve_device(tcfg)
    model.to(device)
    out_dir = Path(out_dir)
    spec = None
    if data_spec is not None:
        fixed = dict(dev_fraction=cfg.dev_fraction, dev_max_examples=cfg.dev_max_examples)
        fixed.update(batch_size=cfg.eval_batch_size, block_size=block, dtype=cfg.dtype)
        spec = EvalSpec(**{"seed": cfg.seed, **data_spec, **fixed})
    if resume and checkpoint.load_train_state(out_dir / "checkpoint") is None:
        raise FileNotFoundError(f"resume: no checkpoint with train state at {out_dir / 'checkpoint'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    encoded = encode_for_training(tok, train_part, block)
    tasks = TaskBatches(encoded, cfg.micro_batch_size, gen, pad_id=tok.eot_id)
    use_mix = cfg.stage == "stage1" and cfg.mix_ratio > 0
    next_batch = MixedBatches(tasks, pretrain_tokens, cfg.mix_ratio, block, gen) if use_mix else tasks
    run_meta = {
        "kind": "finetune",
        "stage": cfg.stage,
        "tasks": sorted({e.task for e in train_examples}),
        "train_examples": len(train_part),
        "dev_examples": len(dev),
        "val_examples": len(val_examples),
        "block_size_used": block,
        "finetune_config": cfg.to_dict(),
        **({"eval_spec": spec.to_dict()} if spec is not None else {}),
        **(meta or {}),
    }
    warm = None
    if resume:
        state = checkpoint.load_train_state(out_dir / "checkpoint")
        next_batch.skip(int(state["step"]) * tcfg.grad_accum_steps)
        warm = checkpoint.read_config(out_dir / "checkpoint")[1].get("router_warmup")
    elif cfg.wants_router_warmup(model):
        warm_on = list(warmup_examples) if warmup_examples is not None else train_part
        warm_enc = encoded if warmup_examples is None else encode_for_training(tok, warm_on, block)
        warm_batches = TaskBatches(
            warm_enc, cfg.micro_batch_size, torch.Generator().manual_seed(cfg.seed + 1), tok.eot_id
        )
        warm = router_warmup(
            model,
            warm_batches,
            tcfg,
            cfg.router_warmup_steps,
            cfg.router_warmup_lr,
            progress,
            metrics=out_dir / "router_warmup.jsonl",
        )
        warm["data"] = sorted({e.task for e in warm_on})
    if warm is not None:
        run_meta["router_warmup"] = warm

    best_acc, best_step = _previous_best(out_dir / "best") if resume else (-math.inf, 0)
    best = {"accuracy": best_acc, "step": best_step}
    history: list[dict[str, float]] = []

    def evaluate(m) -> dict[str, float]:
        r = evaluate_task(m, tok, dev, cfg.eval_batch_size, block_size=block, dtype=cfg.dtype)
        return {"dev_accuracy": r["accuracy"], "dev_acc_norm": r["acc_norm"], "dev_loss": r["loss"]}

    def on_eval(step: int, row: dict[str, float]) -> None:
        history.append({"step": step, **row})
        if row["dev_accuracy"] > best["accuracy"]:
            best.update(accuracy=row["dev_accuracy"], step=step)
            checkpoint.save(model, out_dir / "best", tokenizer=tok, step=step, **row, **run_meta)

    desc = f"finetune {cfg.stage} {','.join(run_meta['tasks'])[:40]}"
    res = fit(
        model,
        tcfg,
        next_batch,
        out_dir,
        gen,
        evaluate,
        resume,
        run_meta,
        progress,
        desc,
        on_eval=on_eval,
        tokenizer=tok,
    )
    chosen = checkpoint.load(out_dir / "best", device=device)  # what is on disk is what gets reported
    chosen_meta = chosen.checkpoint_meta
    report = evaluate_task(chosen, tok, val_examples, cfg.eval_batch_size, block_size=block, dtype=cfg.dtype)
    final = res.eval or {k: chosen_meta.get(k, math.nan) for k in ("dev_accuracy", "dev_loss")}
    result = FinetuneResult(
        accuracy=report["accuracy"],
        acc_norm=report["acc_norm"],
        loss=report["loss"],
        n_report=len(val_examples),
        dev_accuracy=float(chosen_meta["dev_accuracy"]),
        dev_acc_norm=float(chosen_meta["dev_acc_norm"]),
        dev_loss=float(chosen_meta["dev_loss"]),
        best_step=int(chosen_meta["step"]),
        final_dev_accuracy=final["dev_accuracy"],
        final_dev_loss=final["dev_loss"],
        final_train_loss=res.final_loss,
        steps=res.steps,
        seconds=res.seconds + (warm["seconds"] if warm and not resume else 0.0),
        best_checkpoint=str(out_dir / "best"),
        checkpoint=res.checkpoint,
        metrics=res.metrics,
        n_train=len(train_part),
        n_dev=len(dev),
        router_warmup=warm,
        top_pred_share=report["top_pred_share"],
        history=history,
    )
    checkpoint.atomic_write_text(out_dir / "finetune.json", json.dumps(asdict(result), indent=2, default=str))
    return result


# ---------------------------------------------------------------------------------------------------------------
# From a checkpoint on disk (what `smoe-lab finetune` and the notebooks call)
# ---------------------------------------------------------------------------------------------------------------


def task_data(
    task: str,
    corpus: Any = None,
    root: Any = None,
    source: str = "auto",
    max_train_examples: int | None = None,
    max_val_examples: int | None = None,
    seed: int = 0,
    flan: str | Path | None = None,
) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples of a task (any name `load_task` knows), or of "instructions": the stage-1
    instruction mix (max_*_examples then count per instruction task) plus, when given, a FLAN JSONL file.
    The dev split that selects checkpoints is carved from `train` by `finetune` (smoe_lab.protocol.dev_split)."""
    if task == INSTRUCTIONS:
        train = instruction_mix(max_train_examples, seed, "train")
        if flan is not None:
            train += load_flan(flan, seed=seed)
        return train, instruction_mix(max_val_examples, seed, "validation")
    if flan is not None:
        raise ValueError(f"a FLAN file is stage-1 data: use it with task {INSTRUCTIONS!r}, not {task!r}")
    train = load_task(task, "train", root, source, max_train_examples, seed, corpus)
    return train, load_task(task, "validation", root, source, max_val_examples, seed, corpus)


def data_spec(
    task: str,
    corpus: Any,
    max_train_examples: int | None,
    max_val_examples: int | None,
    seed: int,
    root: Any = None,
    source: str = "auto",
) -> dict[str, Any] | None:
    """How `task_data` loaded a task's examples, for the EvalSpec of the chosen checkpoint (None for stage 1)."""
    if task == INSTRUCTIONS:
        return None
    return {
        "task": task.lower(),
        "seed": seed,
        "max_train_examples": max_train_examples,
        "max_eval_examples": max_val_examples,
        "corpus": None if corpus is None else str(corpus),
        "root": None if root is None else str(root),
        "source": source,
    }


def finetune_checkpoint(
    path: str | Path,
    task: str,
    cfg: FinetuneConfig,
    out_dir: str | Path,
    corpus: Any = None,
    root: Any = None,
    source: str = "auto",
    flan: str | Path | None = None,
    max_train_examples: int | None = None,
    base_model: str | None = None,
    resume: bool = False,
    progress: bool = True,
    max_eval_examples: int | None = None,
) -> FinetuneResult:
    """Finetune the checkpoint at `path` on `task` (or "instructions" for stage 1) into out_dir.

    corpus (cloze tasks, stage-1 LM mixing) defaults to the corpus named in the checkpoint's meta. The saved
    checkpoints carry the parent's identity for the results store (base_model, method, z, d; see
    `smoe_lab.results.checkpoint_identity`), the parent path, the task and (tasks) the EvalSpec that
    `smoe-lab evaluate` reproduces the reported numbers with.
    """
    model_cfg, parent_meta = checkpoint.read_config(path)
    corpus = corpus or parent_meta.get("corpus")
    train, val = task_data(task, corpus, root, source, max_train_examples, max_eval_examples, cfg.seed, flan)
    tokens = None
    if cfg.stage == "stage1" and cfg.mix_ratio > 0:
        if corpus is None:
            raise ValueError("stage 1 mixes in pretraining text: pass a corpus (the checkpoint's meta names none)")
        tokens = resolve_corpus(corpus).split("train")
    meta = {
        **checkpoint_identity(model_cfg, parent_meta, base_model),
        "parent": str(path),
        "task": task,
        "corpus": None if corpus is None else str(corpus),
    }
    model = checkpoint.load(path)
    tok = checkpoint.load_tokenizer(path)
    spec = data_spec(task, corpus, max_train_examples, max_eval_examples, cfg.seed, root, source)
    return finetune(model, tok, train, val, cfg, out_dir, tokens, progress, resume, meta, data_spec=spec)
