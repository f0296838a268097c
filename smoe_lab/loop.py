"""The optimisation core: one step loop (`run_steps`) for pretraining, finetuning, the router-only warm-up and the
DeepSpeed engine, and the small pure pieces they share (schedule, parameter groups, metrics log).

An engine plugs in how a micro-batch goes forward and backward and how a step is taken (`Steps`); the loop owns
everything else, the same for every engine:

    for each optimizer step:  fault hook -> train mode -> lr from the schedule (set_lr)
        for each of `accum` micro-batches:  draw -> forward -> measure -> NaN guard -> backward
        clip_and_step (the gradient norm) -> zero_grad
        metrics row (loss, aux, lr, grad_norm, tokens, router telemetry) every log_every steps
        evaluate + on_eval every eval_every steps, then the checkpoint hook (so a checkpoint at step k means step
        k was evaluated)

`TorchSteps` is the torch engine (autocast, loss / accum backward, clip_grad_norm_ over the optimizer's
parameters, AdamW step); `smoe_lab.ds.engine.DeepSpeedSteps` is DeepSpeed's (engine.backward / engine.step, losses
all-reduced over the ranks). `train.fit` and `ds.engine.fit` add resume and checkpoint writing around it;
`finetune.router_warmup` calls it with the routers alone trainable.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import faults
from . import progress as _progress
from .atomic import atomic_write_text
from .config import TrainConfig
from .router_health import health_row

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
            atomic_write_text(path, "".join(x + "\n" for x in keep))

    def write(self, **row: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def telemetry_row(model) -> dict[str, Any]:
    """Router health of the last forward pass per MoE layer (smoe_lab.router_health): entropy (nats and / ln E),
    top-1 gate, largest / smallest expert share, drop fraction."""
    tel = [t for t in model.telemetry() if t is not None]
    if not tel:
        return {}
    return health_row([t.health for t in tel])


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


# -- what an engine plugs in --------------------------------------------------------------------------------------
class Steps:
    """One engine's micro-step and step. `run_steps` calls, per optimizer step: train(), set_lr(lr), then per
    micro-batch forward -> measure -> (NaN guard) -> backward, then clip_and_step() and zero_grad()."""

    nan_note = ""  # appended to the non-finite-loss message after the lm / aux numbers

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device

    def train(self) -> None:
        self.model.train()

    def set_lr(self, lr: float) -> None:
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None):
        """(lm loss, aux loss) of one micro-batch, already on the device."""
        raise NotImplementedError

    def measure(self, loss: torch.Tensor, aux: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, int]:
        """(lm loss, aux loss, target tokens) of the micro-batch as logged."""
        return loss.item(), aux.item(), int(targets.ne(-1).sum())

    def backward(self, loss: torch.Tensor, aux: torch.Tensor, micro: int, accum: int) -> None:
        raise NotImplementedError

    def clip_and_step(self) -> float:
        """Clip the accumulated gradients, take the optimizer step; the gradient norm before clipping."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError


class TorchSteps(Steps):
    """The torch engine: autocast forward, (loss + aux) / accum backward, clip_grad_norm_ over the optimizer's
    parameters (cfg.grad_clip, 0 = no clipping), AdamW step, gradients set to None."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device):
        super().__init__(model, device)
        self.opt, self.cfg = opt, cfg
        self.params = [p for g in opt.param_groups for p in g["params"]]

    def set_lr(self, lr: float) -> None:
        set_lr(self.opt, lr)

    def forward(self, idx, targets, mask):
        with autocast_for(self.device, self.cfg):
            _, loss, aux = self.model(idx, targets, mask=mask)
        return loss, aux

    def backward(self, loss, aux, micro, accum) -> None:
        ((loss + aux) / accum).backward()

    def clip_and_step(self) -> float:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.opt.step()
        return float(grad_norm)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)


# -- the loop -----------------------------------------------------------------------------------------------------
def nan_message(step: int, lm: float, aux: float, note: str, ck_path: Path | None) -> str:
    last = ck_path if ck_path is not None and ck_path.exists() else "none"
    return (
        f"non-finite loss at step {step} (lm {lm:.4g}, aux {aux:.4g}{note}); last good checkpoint: {last} "
        "- lower the learning rate"
    )


def run_steps(
    steps: Steps,
    cfg: TrainConfig,
    draw: Callable[[], Batch],
    accum: int,
    start: int = 0,
    log: MetricsLog | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    save: Callable[[int], None] | None = None,
    ck_path: Path | None = None,
    metrics_path: Path | None = None,
    progress: bool = True,
    desc: str = "train",
    kind: str = "train",
    fault_point: str | None = "step",
    on_nan: Callable[[int, float, float], str] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> FitResult:
    """Optimise steps start .. cfg.max_steps - 1; each step accumulates `accum` micro-batches from draw().

    The lr of step s is lr_at(s, cfg). A row of kind `kind` goes to `log` at every cfg.log_every-th step, the last
    and the first one run; evaluate(model) runs every cfg.eval_every steps and at the end (its row to `log`, then
    on_eval(step, row)); save(step) runs every cfg.checkpoint_every steps and at the end, after the evaluation.
    A non-finite loss raises FloatingPointError before anything is written for that step; its message is
    on_nan(step, lm, aux) or names the last good checkpoint (ck_path). fault_point: the faults.hit point at the start
    of every step (None: no hook). on_step(step, loss, grad_norm) runs after every step (steps counted from 1).
    """
    model = steps.model
    tokens_per_step = 0
    t0 = time.perf_counter()
    last_loss = float("nan")
    eval_row: dict[str, float] = {}
    bar = tqdm(range(start, cfg.max_steps), desc=desc, disable=not progress, initial=start, total=cfg.max_steps)
    ticker = _progress.Ticker(desc, cfg.max_steps)  # lines on a batch run's terminal (smoe_lab.progress)
    for step in bar:
        if fault_point is not None:
            faults.hit(fault_point)  # test hook: SMOE_LAB_KILL_AT=step:N kills the process here (between steps)
        steps.train()
        lr = lr_at(step, cfg)
        steps.set_lr(lr)
        ts = time.perf_counter()
        loss_sum = aux_sum = 0.0
        tokens_per_step = 0
        for micro in range(accum):
            idx, targets, mask = draw()
            idx, targets = idx.to(steps.device), targets.to(steps.device)
            mask = None if mask is None else mask.to(steps.device)
            loss, aux = steps.forward(idx, targets, mask)
            lm, ax, n = steps.measure(loss, aux, targets)
            if not (math.isfinite(lm) and math.isfinite(ax)):
                msg = on_nan(step, lm, ax) if on_nan is not None else nan_message(step, lm, ax, steps.nan_note, ck_path)
                raise FloatingPointError(msg)
            steps.backward(loss, aux, micro, accum)
            loss_sum += lm / accum
            aux_sum += ax / accum
            tokens_per_step += n
        grad_norm = steps.clip_and_step()
        steps.zero_grad()
        last_loss = loss_sum
        dt = time.perf_counter() - ts
        done = step + 1
        if on_step is not None:
            on_step(done, loss_sum, grad_norm)
        if log is not None and (done % cfg.log_every == 0 or done == cfg.max_steps or done == start + 1):
            log.write(
                kind=kind,
                step=done,
                loss=round(loss_sum, 6),
                aux=round(aux_sum, 6),
                lr=lr,
                grad_norm=round(grad_norm, 5),
                tokens=done * tokens_per_step,
                tokens_per_s=round(tokens_per_step / max(dt, 1e-9), 1),
                **telemetry_row(model),
            )
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}")
            ticker.tick(done, f"loss {loss_sum:.3f}, {tokens_per_step / max(dt, 1e-9):,.0f} tokens/s")
        if evaluate is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            eval_row = evaluate(model)
            if log is not None:
                log.write(kind="eval", step=done, tokens=done * tokens_per_step, **eval_row)
            shown = {k: v for k, v in eval_row.items() if isinstance(v, float) and k.endswith(("loss", "accuracy"))}
            _progress.report(
                f"{desc}: step {done}/{cfg.max_steps} eval " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
            )
            if on_eval is not None:
                on_eval(done, eval_row)
        if save is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.max_steps):
            save(done)  # after the evaluation: a checkpoint at step k means step k was evaluated
    return FitResult(
        steps=cfg.max_steps,
        tokens=cfg.max_steps * tokens_per_step,
        seconds=time.perf_counter() - t0,
        final_loss=last_loss,
        eval=eval_row,
        checkpoint=str(ck_path) if ck_path is not None and ck_path.exists() else None,
        metrics=None if metrics_path is None else str(metrics_path),
        peak_memory_mb=peak_memory_mb(steps.device),
    )
