"""Training loops: one optimisation core (`fit`) used by pretraining and finetuning.

AdamW (weight decay on matrices only), linear warmup + linear decay, gradient clipping, gradient accumulation up
to the global batch, bf16 autocast on CUDA / fp32 on CPU, aux loss added with its coefficient, periodic
evaluation, JSONL metrics, tqdm progress, atomic checkpoints and exact resume.

Resume is exact because a checkpoint holds everything the next step reads: weights, optimizer state, the data
generator, the CPU RNG and (on CUDA) every device's RNG. A step's evaluation runs before its checkpoint is
written, so a checkpoint at step k means step k's evaluation (and best-checkpoint choice) happened.
A warmup longer than the run is refused (`TrainConfig.check_schedule`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint, faults
from . import progress as _progress
from .config import ModelConfig, PretrainParams, TrainConfig
from .data.corpus import resolve_corpus
from .model import GPT
from .router_health import HealthMeter, health_row, metered, specialisation_warning

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (idx [B, T], targets [B, T], mask [B, T] | None)
NO_DECAY_SUFFIXES = ("bias", "b_in", "b_out")


# -- small pure pieces --------------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from 0 to cfg.lr over warmup_steps, then linear decay to min_lr at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr + (cfg.min_lr - cfg.lr) * frac


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    router_lr_mult: float = 1.0,
    router_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Weight decay on matrices (embeddings, attention, FFN/expert weights, routers); none on biases and norms.

    Stacked expert biases b_in [E, d_ff] are 2-D but are biases: they are matched by name. With router options
    (router_lr_mult != 1 or router_weight_decay set) the MoE routers' weights form a third group, "router", whose
    "lr_scale" multiplies the schedule's learning rate (`set_lr`) and whose weight decay is router_weight_decay
    (None = weight_decay). With the defaults the groups are exactly the paper's two.
    """
    routers: set[int] = set()
    if router_lr_mult != 1.0 or router_weight_decay is not None:
        layers = model.moe_layers() if hasattr(model, "moe_layers") else []
        routers = {id(m.router.weight) for m in layers}
    decay, no_decay, router = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in routers:
            router.append(p)
            continue
        is_matrix = p.dim() >= 2 and not name.endswith(NO_DECAY_SUFFIXES)
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if router:
        wd = weight_decay if router_weight_decay is None else router_weight_decay
        groups.append({"params": router, "weight_decay": wd, "lr_scale": router_lr_mult, "name": "router"})
    return groups


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr on every group, times the group's "lr_scale" (the router group's multiplier)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, cfg.router_lr_mult, cfg.router_weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=False)


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.engine == "deepspeed":  # joins the launcher's process group; this rank's GPU (cuda:LOCAL_RANK) or cpu
        from .ds.engine import local_device

        return local_device(cfg)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device: 'cuda' requested but no CUDA device is available")
    return torch.device(cfg.device)


def autocast_for(device: torch.device, cfg: TrainConfig):
    """bf16 autocast on CUDA (auto or bfloat16), fp32 on CPU unless bfloat16 is asked for explicitly."""
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan")


class MetricsLog:
    """Append-only JSONL metrics. On resume, lines past the resumed step are dropped (they were never saved)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            checkpoint.atomic_write_text(path, "".join(x + "\n" for x in keep))

    def write(self, **row: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# -- the loop -----------------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    eval: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    metrics: str | None = None
    peak_memory_mb: float = 0.0


def _telemetry_row(model: GPT) -> dict[str, Any]:
    """Router health of the last forward pass per MoE layer (smoe_lab.router_health): entropy (nats and / ln E),
    top-1 gate, largest / smallest expert share, drop fraction."""
    tel = [t for t in model.telemetry() if t is not None]
    if not tel:
        return {}
    return health_row([t.health for t in tel])


def fit(
    model: GPT,
    cfg: TrainConfig,
    next_batch: Callable[[], Batch],
    out_dir: str | Path,
    generator: torch.Generator,
    evaluate: Callable[[GPT], dict[str, float]] | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "train",
    checkpoint_name: str = "checkpoint",
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    tokenizer: Any = None,
) -> FitResult:
    """Optimise loss + aux for cfg.max_steps steps; each step accumulates cfg.grad_accum_steps micro-batches.

    next_batch() draws one micro-batch using `generator` (whose state is checkpointed, so resume is exact). It may
    also be a checkpointable loader (smoe_lab.data.plan.PlanLoader: callable, with state_dict / load_state_dict,
    the consumed-sample count), whose state is saved in the train state as "data" and restored on resume.
    Only parameters with requires_grad are optimised (router-only warm-up freezes the rest).
    Raises FloatingPointError on a non-finite loss, before anything is written for that step.
    cfg.engine == "deepspeed" runs the same loop through DeepSpeed over the launcher's ranks (smoe_lab.ds.engine).
    """
    cfg.check_schedule()
    if cfg.engine == "deepspeed":
        from .ds.engine import fit as deepspeed_fit

        return deepspeed_fit(
            model,
            cfg,
            next_batch,
            out_dir,
            generator,
            evaluate,
            resume,
            meta,
            progress,
            desc,
            checkpoint_name,
            on_eval,
            tokenizer,
        )
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    ck_path = out_dir / checkpoint_name
    opt = make_optimizer(model, cfg)
    start = 0
    if resume:
        state = checkpoint.load_train_state(ck_path)
        if state is None:
            raise FileNotFoundError(f"--resume: no checkpoint with train state at {ck_path}")
        weights = checkpoint.load(ck_path, device=device)
        checkpoint.load_weights_into(model, weights.state_dict(), ck_path)
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"{ck_path / checkpoint.TRAIN_STATE}: optimizer state does not fit this model ({e})"
            ) from None
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start = int(state["step"])
        if hasattr(next_batch, "load_state_dict"):  # a data plan: continue at its consumed-sample count
            next_batch.load_state_dict(state.get("data"))
    log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if resume else None)
    accum = cfg.grad_accum_steps
    tokens_per_step = 0
    t0 = time.perf_counter()
    last_loss = float("nan")
    eval_row: dict[str, float] = {}

    def save(step: int) -> None:
        train_state = {
            "step": step,
            "optimizer": opt.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        if hasattr(next_batch, "state_dict"):
            train_state["data"] = next_batch.state_dict()
        checkpoint.save(model, ck_path, train_state=train_state, tokenizer=tokenizer, step=step, **(meta or {}))

    bar = tqdm(range(start, cfg.max_steps), desc=desc, disable=not progress, initial=start, total=cfg.max_steps)
    ticker = _progress.Ticker(desc, cfg.max_steps)  # lines on a batch run's terminal (smoe_lab.progress)
    for step in bar:
        faults.hit("step")  # test hook: SMOE_LAB_KILL_AT=step:N kills the process here (between steps)
        model.train()
        lr = lr_at(step, cfg)
        set_lr(opt, lr)
        ts = time.perf_counter()
        loss_sum = aux_sum = 0.0
        tokens_per_step = 0
        for _ in range(accum):
            idx, targets, mask = next_batch()
            idx, targets = idx.to(device), targets.to(device)
            mask = None if mask is None else mask.to(device)
            with autocast_for(device, cfg):
                _, loss, aux = model(idx, targets, mask=mask)
            total = (loss + aux) / accum
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"non-finite loss at step {step} (lm {loss.item():.4g}, aux {aux.item():.4g}); "
                    f"last good checkpoint: {ck_path if ck_path.exists() else 'none'} - lower the learning rate"
                )
            total.backward()
            loss_sum += loss.item() / accum
            aux_sum += aux.item() / accum
            tokens_per_step += int(targets.ne(-1).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in opt.param_groups for p in g["params"]], cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
        last_loss = loss_sum
        dt = time.perf_counter() - ts
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps or done == start + 1:
            log.write(
                kind="train",
                step=done,
                loss=round(loss_sum, 6),
                aux=round(aux_sum, 6),
                lr=lr,
                grad_norm=round(float(grad_norm), 5),
                tokens=done * tokens_per_step,
                tokens_per_s=round(tokens_per_step / max(dt, 1e-9), 1),
                **_telemetry_row(model),
            )
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}")
            ticker.tick(done, f"loss {loss_sum:.3f}, {tokens_per_step / max(dt, 1e-9):,.0f} tokens/s")
        if evaluate is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            eval_row = evaluate(model)
            log.write(kind="eval", step=done, tokens=done * tokens_per_step, **eval_row)
            shown = {k: v for k, v in eval_row.items() if isinstance(v, float) and k.endswith(("loss", "accuracy"))}
            _progress.report(
                f"{desc}: step {done}/{cfg.max_steps} eval " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
            )
            if on_eval is not None:
                on_eval(done, eval_row)
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.max_steps:
            save(done)  # after the evaluation: a checkpoint at step k means step k was evaluated
    seconds = time.perf_counter() - t0
    return FitResult(
        steps=cfg.max_steps,
        tokens=cfg.max_steps * tokens_per_step,
        seconds=seconds,
        final_loss=last_loss,
        eval=eval_row,
        checkpoint=str(ck_path) if ck_path.exists() else None,
        metrics=str(out_dir / "metrics.jsonl"),
        peak_memory_mb=peak_memory_mb(device),
    )


# -- pretraining --------------------------------------------------------------------------------------------------
@torch.no_grad()
def lm_eval_loss(model: GPT, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device, cfg: TrainConfig) -> float:
    """Mean LM loss over fixed evaluation windows, in eval mode (eval capacity factor)."""
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        with autocast_for(device, cfg):
            _, loss, _ = model(x.to(device), y.to(device))
        total += loss.item()
        n += 1
    if n == 0:
        raise ValueError("evaluation split is empty: no full block_size window fits in it")
    return total / n


def pretrain(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    corpus: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """Pretrain a GPT (dense or SMoE) on a prepared corpus; checkpoint + metrics.jsonl go to out_dir."""
    from .data.corpus import get_batch, iter_eval_batches

    corpus_obj = resolve_corpus(corpus)
    if corpus_obj.tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"ModelConfig.vocab_size: {model_cfg.vocab_size} is smaller than the corpus tokenizer's "
            f"{corpus_obj.tokenizer.vocab_size}"
        )
    val_tokens = corpus_obj.split("val")
    train_cfg.check_schedule()
    out_dir = Path(out_dir)
    if resume and checkpoint.load_train_state(out_dir / "checkpoint") is None:
        raise FileNotFoundError(f"--resume: no checkpoint with train state at {out_dir / 'checkpoint'}")
    device = resolve_device(train_cfg)
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg, seed=train_cfg.seed).to(device)
    gen = torch.Generator().manual_seed(train_cfg.seed)
    t = model_cfg.block_size

    if corpus_obj.is_sharded:  # a `smoe-lab data build` corpus: its deterministic sample plan, resumed by count
        from .data.plan import PlanLoader, SamplePlan

        next_batch = PlanLoader(SamplePlan.from_corpus(corpus_obj, t, seed=train_cfg.seed), train_cfg.micro_batch_size)
    else:
        train_tokens = corpus_obj.split("train")

        def next_batch() -> Batch:
            x, y = get_batch(train_tokens, train_cfg.micro_batch_size, t, gen)
            return x, y, None

    def evaluate(m: GPT) -> dict[str, float]:
        batches = iter_eval_batches(val_tokens, train_cfg.micro_batch_size, t, max_batches=train_cfg.eval_batches)
        meter = HealthMeter()
        loss = lm_eval_loss(m, metered(batches, m, meter), device, train_cfg)
        return {"val_loss": round(loss, 6), **health_row(meter.result())}

    meta = {
        "kind": "pretrain",
        "corpus": str(corpus_obj.path),
        "label": model_cfg.label(),
        "params": model.num_params(),
        "active_params": model.num_active_params(),
        "train_config": train_cfg.to_dict(),
        "cache_key": pretrain_key(model_cfg, train_cfg, corpus_obj.path),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(out_dir / "run.json", json.dumps(meta, indent=2, default=str))
    desc = f"pretrain {model_cfg.label()}"
    tok = corpus_obj.tokenizer
    res = fit(model, train_cfg, next_batch, out_dir, gen, evaluate, resume, meta, progress, desc, tokenizer=tok)
    warn_if_unspecialised(res.eval.get("entropy_ratio") or _telemetry_row(model).get("entropy_ratio"), desc)
    return res


def warn_if_unspecialised(entropy_ratios: list[float] | None, what: str) -> str | None:
    """Emit (warnings.warn) and return the router-specialisation warning when a layer ends above 0.8 ln E."""
    msg = specialisation_warning(entropy_ratios or [])
    if msg:
        warnings.warn(f"{what}: {msg}", UserWarning, stacklevel=2)
    return msg


def pretrain_key(model_cfg: ModelConfig, train_cfg: TrainConfig, corpus_path: str | Path) -> str:
    """Cache key of a pretraining run: package source, model and train configs, the corpus's content."""
    from .cachekey import corpus_hash, key

    return key("pretrain", model=model_cfg.to_dict(), train=train_cfg.to_dict(), corpus=corpus_hash(corpus_path))


def pretrain_from_params(params: PretrainParams, progress: bool = True) -> FitResult:
    return pretrain(
        params.model_config(), params.train_config(), params.corpus, params.out_dir, params.resume, progress=progress
    )


def steps_for_tokens(tokens: int, cfg: TrainConfig, block_size: int) -> int:
    """Optimizer steps that consume `tokens` tokens at cfg.batch_size sequences of block_size."""
    return max(1, math.ceil(tokens / (cfg.batch_size * block_size)))
