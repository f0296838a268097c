"""The DeepSpeed engine: `smoe_lab.train.fit` over the ranks of the `deepspeed` launcher (data + expert parallel).

`train.fit` routes here when TrainConfig.engine == "deepspeed". The loop is the torch engine's own
(`smoe_lab.loop.run_steps`); this module plugs in `DeepSpeedSteps` (engine.backward / engine.step) and adds
resume and checkpoint writing around it:

- optimiser: the project's torch AdamW (`loop.param_groups`: decay on matrices only; the router group of
  TrainConfig.router_lr_mult / router_weight_decay, its lr scaled by `loop.set_lr`) with DeepSpeed-MoE expert
  parameters split into their own groups (`split_params_into_different_moe_groups_for_optimizer`), handed to
  `deepspeed.initialize` (no DeepSpeed optimizer, so no FusedAdam build); lr set from `loop.lr_at` every step;
- DeepSpeed config (`ds_config`): train_batch_size = batch_size, micro batch per rank = micro_batch_size,
  gradient_accumulation_steps = batch_size // micro_batch_size // world_size, gradient_clipping = grad_clip,
  ZeRO stage = zero_stage, bf16 on GPU (dtype auto or bfloat16; bf16 weights with fp32 master weights in the
  optimizer) and fp32 on CPU;
- data: every rank draws each micro-step's world_size micro-batches from the shared generator and keeps the one
  of its rank, so a step sees the same global batch as the torch engine with the same seed, and the generator
  state (checkpointed) is the same on every rank;
- loss: LM loss + aux (aux_loss_coef already applied by the model), exactly as the torch engine; `engine.backward`
  divides by the accumulation steps. Loss, aux and token counts are all-reduced for logging, which also makes every
  rank see a non-finite loss together (FloatingPointError before backward, nothing written);
- files (rank 0 alone writes): out_dir/metrics.jsonl; out_dir/<checkpoint_name> in the project's format
  (`checkpoint.save`, native layout, float32 weights gathered over the expert-parallel group, train_state with
  step / generator / RNG but no optimizer); out_dir/<checkpoint_name>_deepspeed/<tag> DeepSpeed's engine checkpoint
  (every rank writes its shards: ZeRO-partitioned optimizer state, per-expert files) for exact resume; only the
  newest tag is kept. out_dir must be on a file system every node sees.
- evaluate(model) runs on every rank (expert parallel layers need all ranks in their all-to-all); on_eval and
  the progress bar run on rank 0. As in the torch engine, a step's evaluation runs before its checkpoint is
  written (the loop's order), so a checkpoint at step k means step k was evaluated.

One process without a launcher is a world of size 1 (MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE / LOCAL_RANK
default to a local one-process group): that is how the CPU tests run it, with the gloo backend.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..config import TrainConfig
from ..loop import Batch, FitResult, MetricsLog, Steps, param_groups, run_steps, set_lr
from . import jit
from .convert import StateModel, gather_native_state, native_config

DS_SUFFIX = "_deepspeed"


# -- process group and device -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerator_name() -> str:
    """DeepSpeed's accelerator: 'cuda' on GPU nodes, 'cpu' otherwise (or DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def init_distributed(shm_allreduce: bool = True) -> None:
    """torch.distributed through DeepSpeed: the launcher's environment, or a local one-process group.
    shm_allreduce=False: without DeepSpeed's CPU shm all-reduce op (for processes that never all-reduce; see jit)."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    jit.prepare()  # its own JIT build folder, no stale build lock (a hang for ever otherwise), ninja on PATH
    if not shm_allreduce:
        jit.skip_shm_allreduce()
    if "RANK" not in os.environ:  # not launched by `deepspeed` / torchrun: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "gloo" if accelerator_name() == "cpu" else None  # None: the accelerator's (nccl on CUDA)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def local_device(cfg: TrainConfig) -> torch.device:
    """Initialise the process group and return this rank's device (cuda:LOCAL_RANK, set as current, or cpu)."""
    init_distributed()
    acc = accelerator_name()
    want = acc if cfg.device == "auto" else cfg.device
    if want != acc:
        raise ValueError(
            f"TrainConfig.device: {cfg.device!r} with the deepspeed engine, but DeepSpeed's accelerator is {acc!r} "
            "(DS_ACCELERATOR=cpu selects the CPU)"
        )
    if acc == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


# -- configuration --------------------------------------------------------------------------------------------------
def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step on each rank: batch_size // micro_batch_size // world_size."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_step:
        raise ValueError(
            f"TrainConfig.batch_size: {cfg.batch_size} is not a multiple of micro_batch_size x world_size "
            f"= {cfg.micro_batch_size} x {world_size}"
        )
    return cfg.batch_size // per_step


def use_bf16(cfg: TrainConfig, device_type: str) -> bool:
    return cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device_type == "cuda")


def clips_itself(cfg: TrainConfig, device_type: str) -> bool:
    """fp32 ZeRO-0: the engine clips with the exact global norm itself (DeepSpeed's fp32 ZeRO-0 clipping averages
    the ranks' local norms, which differs from the global norm once experts are spread over ranks)."""
    return cfg.zero_stage == 0 and not use_bf16(cfg, device_type)


def ds_config(cfg: TrainConfig, world_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed config generated from a TrainConfig (see the module docstring)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=device_type == "cuda", reduce_scatter=True)
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "gradient_clipping": 0.0 if clips_itself(cfg, device_type) else float(cfg.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the project's torch AdamW
        "bf16": {"enabled": use_bf16(cfg, device_type)},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """train.make_optimizer's AdamW, with DeepSpeed-MoE expert parameters in their own (moe) groups; the router
    group of TrainConfig.router_lr_mult / router_weight_decay (the gates' wg, shared by every rank) is kept."""
    groups = param_groups(model, cfg.weight_decay, cfg.router_lr_mult, cfg.router_weight_decay)
    for name, g in zip(("decay", "no_decay"), groups):
        g["name"] = name
    if any(getattr(p, "allreduce", True) is False for g in groups for p in g["params"]):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=False)


# -- helpers of the loop ------------------------------------------------------------------------------------------
def _draw(next_batch: Callable[[], Batch], rank: int, world: int) -> Batch:
    """world_size micro-batches from the shared stream; this rank's is the rank-th. A rank-aware loader
    (smoe_lab.data.plan.PlanLoader) reads only this rank's slice of the global batch itself."""
    if getattr(next_batch, "rank_aware", False):
        return next_batch()
    mine = None
    for r in range(world):
        b = next_batch()
        if r == rank:
            mine = b
    return mine


@torch.no_grad()
def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Global norm of the (all-reduced) gradients, clipped in place to max_norm (0: no clipping), as
    torch.nn.utils.clip_grad_norm_ on one process: expert gradients, different on every rank of an expert-parallel
    group, are summed over that group; the others are the same on every rank and counted once."""
    shared = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    group_name = None
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "allreduce", True) is False:  # a DeepSpeed-MoE expert parameter
            expert += sq
            group_name = p.group_name
        else:
            shared += sq
    if group_name is not None and model.config.ep_size > 1:
        from deepspeed.utils import groups

        dev = grads[0].device
        total = expert.to(dev)
        torch.distributed.all_reduce(total, group=groups._get_expert_parallel_group(group_name))
        expert = total.cpu()
    norm = float((shared + expert).sqrt())
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm


def _rng_file(ds_dir: Path, tag: str, rank: int) -> Path:
    return ds_dir / tag / f"smoe_rng_rank{rank:05d}.pt"


def _rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


class DeepSpeedSteps(Steps):
    """The DeepSpeed engine's pieces of the step loop (smoe_lab.loop.run_steps): forward through the engine, losses
    and token counts all-reduced over the ranks (so every rank sees a non-finite loss together), engine.backward
    (which divides by the accumulation steps) and engine.step after every micro-batch (DeepSpeed steps the
    optimizer at the accumulation boundary); the exact global gradient norm clipped here for fp32 ZeRO-0
    (`clips_itself`), else DeepSpeed's clipping and norm. Gradients are zeroed by the engine."""

    nan_note = " averaged over ranks"

    def __init__(self, engine, model, cfg: TrainConfig, device: torch.device, world: int):
        super().__init__(model, device)
        self.engine, self.cfg, self.world = engine, cfg, world
        self.own_clip = clips_itself(cfg, device.type)

    def train(self) -> None:
        self.engine.train()

    def set_lr(self, lr: float) -> None:
        set_lr(self.engine.optimizer, lr)  # the router group's lr_scale applies (TrainConfig.router_lr_mult)

    def forward(self, idx, targets, mask):
        _, loss, aux = self.engine(idx, targets, mask=mask)
        return loss, aux

    def measure(self, loss, aux, targets) -> tuple[float, float, int]:
        here = torch.stack([loss.detach().double(), aux.detach().double(), targets.ne(-1).sum().double()])
        torch.distributed.all_reduce(here)
        return float(here[0]) / self.world, float(here[1]) / self.world, int(here[2])

    def backward(self, loss, aux, micro, accum) -> None:
        self.engine.backward(loss + aux)
        if micro < accum - 1:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def clip_and_step(self) -> float:
        grad_norm = float("nan")
        if self.own_clip:  # gradients are all-reduced at the accumulation boundary
            grad_norm = clip_grad_norm(self.model, self.cfg.grad_clip)
        self.engine.step()
        if not self.own_clip:
            gn = self.engine.get_global_grad_norm()
            grad_norm = float("nan") if gn is None else float(gn)
        return grad_norm

    def zero_grad(self) -> None:
        pass  # the engine zeroes the gradients in its step


# -- the loop -------------------------------------------------------------------------------------------------------
def fit(
    model,
    cfg: TrainConfig,
    next_batch: Callable[[], Batch],
    out_dir: str | Path,
    generator: torch.Generator,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "train",
    checkpoint_name: str = "checkpoint",
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    tokenizer: Any = None,
) -> FitResult:
    """`train.fit` on the DeepSpeed engine (same arguments, same files, same result; see the module docstring)."""
    import deepspeed

    device = local_device(cfg)
    rank, world = rank_and_world()
    accum = grad_accum_steps(cfg, world)
    if hasattr(next_batch, "set_rank"):  # a data plan: this rank's slice of every global batch
        next_batch.set_rank(rank, world)
    model.to(device)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=make_optimizer(model, cfg), config=ds_config(cfg, world, device.type)
    )
    out_dir = Path(out_dir)
    ck_path = out_dir / checkpoint_name
    ds_dir = out_dir / f"{checkpoint_name}{DS_SUFFIX}"
    engine_meta = {
        "engine": "deepspeed",
        "world_size": world,
        "zero_stage": cfg.zero_stage,
        "moe_impl": model.config.moe_impl,
        "ep_size": model.config.ep_size,
    }
    start = 0
    if resume:
        state = checkpoint.load_train_state(ck_path)
        if state is None or "deepspeed_tag" not in state:
            raise FileNotFoundError(f"--resume: no deepspeed-engine checkpoint with train state at {ck_path}")
        tag = state["deepspeed_tag"]
        load_path, _ = engine.load_checkpoint(str(ds_dir), tag=tag, load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"--resume: DeepSpeed checkpoint {ds_dir / tag} could not be loaded")
        generator.set_state(state["generator"])
        if hasattr(next_batch, "load_state_dict"):  # consumed samples: the same on every rank
            next_batch.load_state_dict(state.get("data"))
        rng_file = _rng_file(ds_dir, tag, rank)
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else {"torch": state["torch_rng"]}
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        start = int(state["step"])
    log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if resume else None) if rank == 0 else None

    def save(step: int) -> None:
        tag = f"global_step{step}"
        client = {
            "smoe_step": step,
            "smoe_model_config": model.config.to_dict(),
            "smoe_meta": {**(meta or {}), "train_engine": engine_meta},
            "smoe_project_checkpoint": str(ck_path),
        }
        engine.save_checkpoint(str(ds_dir), tag=tag, client_state=client)  # collective: every rank its shards
        rng_file = _rng_file(ds_dir, tag, rank)
        rng_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), rng_file)
        state = gather_native_state(model)  # collective within the first expert-parallel group
        if rank == 0:
            train_state = {
                "step": step,
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "deepspeed_tag": tag,
            }
            if hasattr(next_batch, "state_dict"):
                train_state["data"] = next_batch.state_dict()
            weights = StateModel(state, native_config(model.config))
            extra = {**(meta or {}), "train_engine": engine_meta}
            checkpoint.save(weights, ck_path, train_state=train_state, tokenizer=tokenizer, step=step, **extra)
            for old in ds_dir.glob("global_step*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    return run_steps(
        DeepSpeedSteps(engine, model, cfg, device, world),
        cfg,
        lambda: _draw(next_batch, rank, world),
        accum,
        start=start,
        log=log,
        evaluate=evaluate,
        on_eval=on_eval if rank == 0 else None,
        save=save,
        ck_path=ck_path,
        metrics_path=out_dir / "metrics.jsonl",
        progress=progress and rank == 0,
        desc=desc,
    )
