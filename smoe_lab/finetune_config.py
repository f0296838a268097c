"""Finetuning settings (`FinetuneConfig`, paper values in `FinetuneConfig.paper()`) and how they become the step
loop's TrainConfig. The run itself is smoe_lab.finetune; FinetuneConfig is re-exported there."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from .config import TrainConfig, _check_number, _check_positive_int, _fail, _FromDict

log = logging.getLogger("smoe_lab")

STAGES = ("stage1", "stage2")
ROUTER_WARMUP_ON = ("reduced", "always")


@dataclass
class FinetuneConfig(_FromDict):
    """Finetuning settings. Defaults are the paper's Table 8 values except the budget (1 epoch), the sequence
    length (None = the model's block_size) and the router warm-up (off); `paper()` is the full paper setting.

    steps: optimizer steps; 0 derives them from epochs: ceil(epochs * train examples / batch_size).
    batch_size: global batch in examples; micro_batch_size examples go through the model at once.
    router_warmup_steps / router_warmup_lr: router-only training before full finetuning; it runs when
    router_warmup_steps > 0 and the model is reduced (config.expert_map set) or router_warmup_on == "always".
    eval_every: evaluate on the dev split (and keep the best checkpoint) every so many steps; 0 = only at the end.
    dev_fraction / dev_max_examples: the share of the train examples held out (seeded by `seed`, whole passages)
    as the dev split that selects the checkpoint, at most dev_max_examples of them (0 = no cap).
    mix_ratio (stage 1 only): fraction of micro-batches that are pretraining LM windows instead of instructions.
    """

    stage: str = "stage2"
    steps: int = 0
    epochs: float = 1.0
    batch_size: int = 64
    micro_batch_size: int = 16
    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 500
    weight_decay: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    router_warmup_steps: int = 0
    router_warmup_lr: float = 1e-4
    router_warmup_on: str = "reduced"
    eval_every: int = 0
    dev_fraction: float = 0.1
    dev_max_examples: int = 0
    eval_batch_size: int = 16
    block_size: int | None = None
    mix_ratio: float = 0.0
    seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        c = "FinetuneConfig"
        if self.stage not in STAGES:
            _fail(c, "stage", f"must be one of {STAGES}, got {self.stage!r}")
        for name in ("batch_size", "micro_batch_size", "eval_batch_size", "log_every"):
            _check_positive_int(c, name, getattr(self, name))
        for name in ("steps", "warmup_steps", "router_warmup_steps", "eval_every", "dev_max_examples", "seed"):
            _check_positive_int(c, name, getattr(self, name), minimum=0)
        _check_positive_int(c, "checkpoint_every", self.checkpoint_every, minimum=0)
        if self.block_size is not None:
            _check_positive_int(c, "block_size", self.block_size)
        if self.batch_size % self.micro_batch_size:
            _fail(
                c,
                "batch_size",
                f"must be a multiple of micro_batch_size={self.micro_batch_size}, got {self.batch_size}",
            )
        if self.steps == 0:
            _check_number(c, "epochs", self.epochs, 0.0, lo_open=True)
        _check_number(c, "lr", self.lr, 0.0, lo_open=True)
        _check_number(c, "min_lr", self.min_lr, 0.0, self.lr)
        _check_number(c, "router_warmup_lr", self.router_warmup_lr, 0.0, lo_open=True)
        _check_number(c, "weight_decay", self.weight_decay, 0.0)
        _check_number(c, "beta1", self.beta1, 0.0, 1.0)
        _check_number(c, "beta2", self.beta2, 0.0, 1.0)
        _check_number(c, "eps", self.eps, 0.0, lo_open=True)
        _check_number(c, "grad_clip", self.grad_clip, 0.0)
        _check_number(c, "mix_ratio", self.mix_ratio, 0.0, 1.0)
        _check_number(c, "dev_fraction", self.dev_fraction, 0.0, 1.0, lo_open=True)
        if self.dev_fraction >= 1.0:
            _fail(c, "dev_fraction", f"must be < 1 (something must be left to train on), got {self.dev_fraction}")
        if self.steps and self.warmup_steps > self.steps:
            _fail(
                c,
                "warmup_steps",
                f"{self.warmup_steps} exceeds steps={self.steps}: the learning rate would never reach lr={self.lr:g}"
                " (lower warmup_steps or raise steps)",
            )
        if self.mix_ratio >= 1.0:
            _fail(c, "mix_ratio", f"must be < 1 (some micro-batches must be task data), got {self.mix_ratio}")
        if self.stage == "stage2" and self.mix_ratio > 0:
            _fail(c, "mix_ratio", f"stage2 finetunes on the task alone: must be 0, got {self.mix_ratio}")
        if self.router_warmup_on not in ROUTER_WARMUP_ON:
            _fail(c, "router_warmup_on", f"must be one of {ROUTER_WARMUP_ON}, got {self.router_warmup_on!r}")
        TrainConfig(device=self.device, dtype=self.dtype)  # validates device and dtype (same rules)

    @classmethod
    def paper(cls, stage: str = "stage2", **overrides: Any) -> FinetuneConfig:
        """The paper's finetuning setting (Table 8): AdamW lr 1e-6 with 500 linear warmup steps then linear decay,
        50 epochs, weight decay 0.001, global batch 64, eps 1e-8, betas 0.9/0.95, clip 1.0, sequence length 256.

        The paper's text (A4) says 256 tokens, its Table 8 says 128: we use 256. Not in the paper, our choices:
        router warm-up of 100 steps at lr 1e-4 ("a few steps"), stage-1 mix_ratio 0.25 ("a portion").
        """
        base = dict(
            stage=stage,
            epochs=50.0,
            batch_size=64,
            micro_batch_size=16,
            lr=1e-6,
            min_lr=0.0,
            warmup_steps=500,
            weight_decay=0.001,
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            grad_clip=1.0,
            block_size=256,
            router_warmup_steps=100,
            router_warmup_lr=1e-4,
            mix_ratio=0.25 if stage == "stage1" else 0.0,
        )
        return cls.from_dict({**base, **overrides})

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps of the run: `steps`, or ceil(epochs * n_train / batch_size)."""
        return self.steps or max(1, math.ceil(self.epochs * n_train / self.batch_size))

    def warmup_for(self, max_steps: int) -> int:
        """warmup_steps, clamped (with a logged warning) to a run of max_steps derived from epochs."""
        if self.warmup_steps <= max_steps:
            return self.warmup_steps
        log.warning(
            "FinetuneConfig.warmup_steps: %d exceeds the run's %d steps (epochs=%g); warming up over %d steps so the "
            "peak lr %g is reached",
            self.warmup_steps,
            max_steps,
            self.epochs,
            max_steps,
            self.lr,
        )
        return max_steps

    def train_config(self, max_steps: int) -> TrainConfig:
        """The `fit` settings for a run of max_steps steps (eval_every 0 -> evaluate at the end only)."""
        return TrainConfig(
            max_steps=max_steps,
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_for(max_steps),
            weight_decay=self.weight_decay,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            grad_clip=self.grad_clip,
            eval_every=self.eval_every or max_steps,
            checkpoint_every=self.checkpoint_every,
            log_every=self.log_every,
            seed=self.seed,
            device=self.device,
            dtype=self.dtype,
        )

    def wants_router_warmup(self, model) -> bool:
        if self.router_warmup_steps == 0 or not model.moe_layers():
            return False
        return self.router_warmup_on == "always" or model.config.expert_map is not None
