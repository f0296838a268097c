"""Inference cost under expert parallelism: `smoe-lab profile` and `run_profile`.

    smoe-lab profile --preset tiny --experts 1,8,32 --ranks 1,2 --ep-size 2 --out runs/profile
    smoe-lab profile --checkpoints 8e=runs/q/pretrain/8e-s0/checkpoint 32e=... --ranks 1,2,4 --ep-size 2 --out DIR

One command starts the ranks itself: for every rank count it launches that many processes of
`smoe_lab.inference.ep_worker` (RANK / WORLD_SIZE / LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free port; gloo on the
CPU, NCCL on GPUs, one GPU per rank) that build every model with DeepSpeed-MoE layers and profile them side by side
(interleaved rounds; see the worker's docstring for the protocol). A rank count of 1 is the single-process baseline:
no expert parallelism, so no all-to-all (its all-to-all columns are empty, not zero). For more than one rank the
experts of every MoE layer are spread over `ep_size` consecutive ranks (DeepSpeed's expert-parallel groups), and the
groups are data parallel: every rank runs its own batch.

Defaults are the paper's protocol (Sec 3): batch 2 per rank, 256 tokens, 5 warm-up passes then 10 timed, median
with the interquartile range as spread. Everything is checked before any rank starts (bad arguments raise
ValueError naming the problem).

Files under --out: profile.csv (one row per (model, ranks)), profile_layers.csv (one row per (model, ranks, MoE
layer)), profile.json (protocol, machine, what every column means), raw/<ranks>.json (every rank's per-pass numbers)
and logs/<ranks>-rank<k>.log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import checkpoint
from ..config import ModelConfig, _FromDict
from ..ds.convert import native_config
from ..paths import PACKAGE_DIR

OVERSUBSCRIBE_FACTOR = 4  # with --oversubscribe a CPU run may start up to this many ranks per core

COLUMNS = {
    "model": "model label",
    "experts": "experts per MoE layer (the largest, for per-layer lists; 1 = dense)",
    "ranks": "processes (one GPU each on CUDA)",
    "ep_size": "expert-parallel group size (1 at 1 rank: no expert parallelism)",
    "latency_ms": "forward pass of the whole model (slowest rank), clean passes, median",
    "all2all_ms": "all-to-all per MoE layer: dispatch + combine, mean over MoE layers and ranks, median; empty without "
    "expert parallelism",
    "expert_ms": "expert compute per MoE layer (the local experts' FFNs), mean over MoE layers and ranks, median",
    "tokens_per_s": "tokens of all ranks per second of clean latency, median",
    "latency_ms_q25": "25th percentile of latency_ms (spread: q25-q75)",
    "latency_ms_q75": "75th percentile of latency_ms",
    "all2all_ms_q25": "25th percentile of all2all_ms",
    "all2all_ms_q75": "75th percentile of all2all_ms",
    "expert_ms_q25": "25th percentile of expert_ms",
    "expert_ms_q75": "75th percentile of expert_ms",
    "tokens_per_s_q25": "25th percentile of tokens_per_s",
    "tokens_per_s_q75": "75th percentile of tokens_per_s",
    "all2all_wait_ms": "of all2all_ms: waiting for the last rank of the expert-parallel group to arrive (host clock, "
    "CPU only)",
    "all2all_transfer_ms": "of all2all_ms: the exchange after the last rank arrived (host clock, CPU only)",
    "all2all_dispatch_ms": "1st all-to-all (tokens to their experts' ranks) per MoE layer, median",
    "all2all_combine_ms": "2nd all-to-all (expert outputs back) per MoE layer, median",
    "gate_ms": "router + top-1 gating per MoE layer, median",
    "moe_other_ms": "rest of an MoE layer (dispatch/combine einsums, reshapes): moe_ms - all-to-all - experts - gate",
    "moe_ms": "whole MoE layer (DeepSpeed's MOELayer timer) per layer, median",
    "moe_layers": "MoE layers in the model",
    "all2all_share_moe": "all-to-all / MoE layer time (instrumented passes), median",
    "all2all_share_latency": "all-to-all of all MoE layers / model latency (instrumented passes), median",
    "non_moe_ms": "model latency outside the MoE layers (attention, dense FFNs, embeddings, head), median",
    "instrumented_latency_ms": "latency of the instrumented passes (timers on), median: the measurement's overhead",
    "weights_mb": "parameters + buffers held by one rank, MiB",
    "peak_mem_mb": "peak memory of one forward pass on the busiest rank, weights included, MiB",
    "peak_mem_source": "cuda-allocator | cpu-profiler (torch.profiler memory timeline) | unavailable",
    "params": "parameters of the whole model (all experts)",
    "params_per_rank": "parameters held by one rank",
    "local_experts": "experts per MoE layer on one rank",
    "batch_size": "sequences per rank per pass",
    "seq_len": "tokens per sequence",
    "device": "cpu | cuda",
    "backend": "gloo | nccl",
    "dtype": "float32 | bfloat16",
    "threads_per_rank": "torch CPU threads per rank",
    "oversubscribed": "more CPU threads than cores: times include the OS scheduler",
    "reps": "timed rounds",
    "warmup": "warm-up passes per model",
    "checkpoint": "checkpoint folder ('' = random weights from the preset)",
}


@dataclass
class ProfileConfig(_FromDict):
    """The measurement protocol. Defaults: the paper's (batch 2 per rank, 256 tokens, 5 warm-up + 10 timed)."""

    ranks: list[int] = field(default_factory=lambda: [1, 2])
    ep_size: int = 2
    batch_size: int = 2
    seq_len: int = 256
    warmup: int = 5
    reps: int = 10
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16
    threads: int = 0  # torch threads per rank on the CPU (0: cores // the largest rank count, at least 1)
    oversubscribe: bool = False  # allow more CPU ranks than cores (numbers then include the OS scheduler)
    isolate: bool = False  # one process group per model instead of every model side by side in one group
    memory: bool = True  # one extra pass per model for its peak memory
    seed: int = 0
    timeout_s: float = 1800.0  # per process group

    def __post_init__(self) -> None:
        c = "ProfileConfig"
        if not isinstance(self.ranks, list) or not self.ranks:
            raise ValueError(f"{c}.ranks: needs a non-empty list of rank counts, got {self.ranks!r}")
        for r in self.ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"{c}.ranks: rank counts must be integers >= 1, got {r!r}")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"{c}.ranks: has duplicates: {self.ranks}")
        self.ranks = sorted(self.ranks)
        for name in ("ep_size", "batch_size", "seq_len", "reps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{c}.{name}: must be an integer >= 1, got {v!r}")
        for name in ("warmup", "threads", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{c}.{name}: must be an integer >= 0, got {v!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"{c}.device: must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"{c}.dtype: must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"{c}.timeout_s: must be a positive number of seconds, got {self.timeout_s!r}")
        for name in ("oversubscribe", "isolate", "memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{c}.{name}: must be true or false, got {getattr(self, name)!r}")
        if self.ep_size > self.ranks[-1]:
            raise ValueError(
                f"ep_size {self.ep_size} is more than the largest rank count {self.ranks[-1]}: an expert-parallel "
                "group needs ep_size ranks"
            )
        for r in self.ranks:
            if r > 1 and (r < self.ep_size or r % self.ep_size):
                raise ValueError(
                    f"ep_size {self.ep_size} must divide every rank count above 1 (DeepSpeed's expert-parallel groups "
                    f"tile the ranks), got ranks {self.ranks}"
                )

    def ep_for(self, ranks: int) -> int:
        """The expert-parallel size at `ranks` processes: 1 for the single-process baseline, else ep_size."""
        return 1 if ranks == 1 else self.ep_size

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("ProfileConfig.device: 'cuda' requested but no CUDA device is visible")
        return self.device

    def resolved_dtype(self, device: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device == "cuda" else "float32"


@dataclass
class ProfileModel:
    """One model to profile: a preset config with random weights, or a checkpoint folder."""

    label: str
    config: dict[str, Any]  # ModelConfig fields (native layout)
    checkpoint: str = ""
    seed: int = 0

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config)

    @property
    def experts(self) -> int:
        return max(self.model_config.experts_per_layer or [1])

    def to_spec(self) -> dict[str, Any]:
        return {"label": self.label, "config": self.config, "checkpoint": self.checkpoint, "experts": self.experts}


def label_for(num_experts: int) -> str:
    return "dense" if num_experts == 1 else f"{num_experts}e"


def preset_models(
    preset: str, experts: list[int], seq_len: int, overrides: dict[str, Any] | None = None, seed: int = 0
) -> list[ProfileModel]:
    """Random-weight models of a preset, one per expert count (1 = dense); block_size raised to seq_len if needed."""
    if not experts:
        raise ValueError("--experts needs at least one expert count (1 = dense)")
    out = []
    for e in experts:
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(f"--experts: expert counts must be integers >= 1 (1 = dense), got {e!r}")
        cfg = ModelConfig.preset(preset, **{**(overrides or {}), "num_experts": e})
        if cfg.block_size < seq_len:  # random weights: a longer position table costs nothing per token
            cfg = cfg.replace(block_size=seq_len)
        out.append(ProfileModel(label_for(e), cfg.to_dict(), seed=seed))
    return out


def checkpoint_models(items: list[str]) -> list[ProfileModel]:
    """`PATH` or `LABEL=PATH` items -> models (label: the folder name, or its parent's for `.../checkpoint`)."""
    out = []
    for item in items:
        label, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        p = Path(path)
        cfg, _ = checkpoint.read_config(p)  # FileNotFoundError names the folder
        label = label or (p.parent.name if p.name in ("checkpoint", "best") else p.name)
        out.append(ProfileModel(label, native_config(cfg).to_dict(), checkpoint=str(p.resolve())))
    return out


def max_ranks(device: str, oversubscribe: bool) -> int:
    """The most ranks this machine allows: one GPU per rank on CUDA; the cores (x4 with oversubscribe) on a CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.device_count()
    cores = os.cpu_count() or 1
    return cores * OVERSUBSCRIBE_FACTOR if oversubscribe else cores


def validate(models: list[ProfileModel], cfg: ProfileConfig, device: str) -> None:
    """Every check that can fail, before any rank starts."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("smoe-lab profile needs DeepSpeed: pip install -e '.[deepspeed]'")
    if not models:
        raise ValueError("nothing to profile: give --preset with --experts, or --checkpoints")
    labels = [m.label for m in models]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"model labels must be unique, got {dup} twice (name checkpoints as LABEL=PATH)")
    limit = max_ranks(device, cfg.oversubscribe)
    if cfg.ranks[-1] > limit:
        why = (
            f"{limit} visible GPU(s), one per rank"
            if device == "cuda"
            else f"{os.cpu_count()} CPU cores"
            + (
                ""
                if cfg.oversubscribe
                else f"; --oversubscribe allows up to {(os.cpu_count() or 1) * OVERSUBSCRIBE_FACTOR}"
            )
        )
        raise ValueError(f"--ranks {cfg.ranks[-1]}: more ranks than allowed on {device} ({why})")
    ep = cfg.ep_size if cfg.ranks[-1] > 1 else 1
    for m in models:
        mc = m.model_config
        bad = [e for e in mc.experts_per_layer if e % ep]
        if bad:
            raise ValueError(
                f"ep_size {ep} must divide the expert count of every MoE layer; model {m.label} has "
                f"{mc.experts_per_layer}"
            )
        if cfg.seq_len > mc.block_size:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds model {m.label}'s block_size {mc.block_size}")
    if len({m.model_config.vocab_size for m in models}) > 1 and not cfg.isolate:
        raise ValueError("models side by side need one vocab_size (they read the same token ids); use isolate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _code_hash() -> str:
    h = hashlib.sha256()
    for f in sorted((PACKAGE_DIR / "inference").glob("ep_*.py")) + [PACKAGE_DIR / "ds" / "moe.py"]:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


class RankFailure(RuntimeError):
    """A rank exited with an error or the group timed out; the message names the log."""


def launch_group(spec: dict[str, Any], name: str, out_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Start spec['ranks'] worker processes on 127.0.0.1, wait for all, return rank 0's result document."""
    raw, logs = out_dir / "raw", out_dir / "logs"
    raw.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(raw / f"{name}.json")}
    spec_path = raw / f"{name}.spec.json"
    checkpoint.atomic_write_text(spec_path, json.dumps(spec, indent=1))
    port = _free_port()
    pythonpath = os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs, files = [], []
    for rank in range(spec["ranks"]):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(spec["ranks"]),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(spec["ranks"]),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=str(spec["threads"]),
            DS_ACCELERATOR=spec["device"],
            PYTHONPATH=pythonpath,
            TOKENIZERS_PARALLELISM="false",
        )
        log = open(logs / f"{name}-rank{rank}.log", "w")  # noqa: SIM115 - closed below
        files.append(log)
        cmd = [sys.executable, "-m", "smoe_lab.inference.ep_worker", str(spec_path)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            failed = next((k for k, p in enumerate(procs) if p.returncode not in (None, 0)), None)
            if failed is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        failed = next((k for k, p in enumerate(procs) if p.returncode not in (None, 0)), failed)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    if failed is not None or any(p.returncode != 0 for p in procs):
        k = failed if failed is not None else next(k for k, p in enumerate(procs) if p.returncode != 0)
        log = logs / f"{name}-rank{k}.log"
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        last = lines[-1] if lines else "(no output)"
        what = "timed out" if time.monotonic() > deadline else f"exited with code {procs[k].returncode}"
        raise RankFailure(f"profile run {name}: rank {k} {what}: {last} (log: {log})")
    return json.loads(Path(spec["result"]).read_text())


def _stats(x: np.ndarray) -> tuple[float, float, float]:
    """(median, q25, q75) ignoring NaN; NaN when nothing was measured."""
    x = np.asarray(x, dtype=float)
    if x.size == 0 or np.all(np.isnan(x)):
        return (float("nan"),) * 3
    return tuple(float(v) for v in np.nanpercentile(x, [50, 25, 75]))  # type: ignore[return-value]


def _a2a_split(ranks: list[dict], ep: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Host enter/exit times of every all-to-all -> (wait, transfer) ms per pass and MoE layer, mean over ranks.

    wait: from this rank's arrival until the last rank of its expert-parallel group arrived (the collective cannot
    finish before); transfer: from that last arrival until this rank left. Their sum is the collective's wall time.
    """
    clk = np.array([r.get("a2a_clock_s") or [] for r in ranks], dtype=float)  # [world, reps, L, 2 calls, 2]
    if ep < 2 or clk.ndim != 5 or np.isnan(clk).all():
        return None, None
    world = clk.shape[0]
    grouped = clk.reshape(world // ep, ep, *clk.shape[1:])  # DeepSpeed's groups: consecutive ranks
    last = grouped[..., 0].max(axis=1, keepdims=True)  # [G, 1, reps, L, 2]
    wait = (last - grouped[..., 0]).reshape(world, *clk.shape[1:4])
    transfer = (grouped[..., 1] - last).reshape(world, *clk.shape[1:4])
    return 1000.0 * wait.mean(axis=0).sum(axis=-1), 1000.0 * transfer.mean(axis=0).sum(axis=-1)


def summarize(doc: dict[str, Any], models: list[ProfileModel]) -> tuple[list[dict], list[dict]]:
    """A worker's raw document -> (one summary row per model, one row per MoE layer)."""
    spec = doc["spec"]
    by_label = {m.label: m for m in models}
    world, b, t = spec["ranks"], spec["batch_size"], spec["seq_len"]
    rows, layer_rows = [], []
    for res in doc["models"]:
        m = by_label[res["label"]]
        ranks = res["ranks"]
        clean = np.array([r["clean_ms"] for r in ranks]).max(axis=0)  # [reps]: the slowest rank
        inst = np.array([r["instrumented_ms"] for r in ranks]).max(axis=0)
        tps = world * b * t / (clean / 1000.0)
        row: dict[str, Any] = {"model": m.label, "experts": m.experts, "ranks": world, "ep_size": spec["ep_size"]}
        lat = _stats(clean)
        row.update(latency_ms=lat[0], all2all_ms=np.nan, expert_ms=np.nan, tokens_per_s=_stats(tps)[0])
        row.update(latency_ms_q25=lat[1], latency_ms_q75=lat[2])
        layers = res["moe_layers"]
        if layers:
            st = np.array([r["stages_ms"] for r in ranks]).mean(axis=0)  # [reps, L, 5]: mean over ranks
            a2a = st[:, :, 0] + st[:, :, 1]  # [reps, L]
            a2a_stats, exp_stats = _stats(a2a.mean(axis=1)), _stats(st[:, :, 2].mean(axis=1))
            other = st[:, :, 4] - np.nan_to_num(a2a) - st[:, :, 2] - st[:, :, 3]
            moe_sum = st[:, :, 4].sum(axis=1)
            wait, transfer = _a2a_split(ranks, spec["ep_size"])  # [reps, L] each, or None
            if wait is not None:
                row.update(
                    all2all_wait_ms=_stats(wait.mean(axis=1))[0], all2all_transfer_ms=_stats(transfer.mean(axis=1))[0]
                )
            row.update(all2all_ms=a2a_stats[0], expert_ms=exp_stats[0])
            row.update(all2all_ms_q25=a2a_stats[1], all2all_ms_q75=a2a_stats[2])
            row.update(expert_ms_q25=exp_stats[1], expert_ms_q75=exp_stats[2])
            row.update(
                all2all_dispatch_ms=_stats(st[:, :, 0].mean(axis=1))[0],
                all2all_combine_ms=_stats(st[:, :, 1].mean(axis=1))[0],
                gate_ms=_stats(st[:, :, 3].mean(axis=1))[0],
                moe_other_ms=_stats(other.mean(axis=1))[0],
                moe_ms=_stats(st[:, :, 4].mean(axis=1))[0],
                all2all_share_moe=_stats(a2a.sum(axis=1) / moe_sum)[0],
                all2all_share_latency=_stats(a2a.sum(axis=1) / inst)[0],
                non_moe_ms=_stats(inst - moe_sum)[0],
            )
            for li in range(layers):
                la, le = _stats(a2a[:, li]), _stats(st[:, li, 2])
                layer_rows.append(
                    {
                        "model": m.label,
                        "experts": m.experts,
                        "ranks": world,
                        "ep_size": spec["ep_size"],
                        "layer": li,
                        "all2all_ms": la[0],
                        "all2all_ms_q25": la[1],
                        "all2all_ms_q75": la[2],
                        "all2all_dispatch_ms": _stats(st[:, li, 0])[0],
                        "all2all_combine_ms": _stats(st[:, li, 1])[0],
                        "expert_ms": le[0],
                        "expert_ms_q25": le[1],
                        "expert_ms_q75": le[2],
                        "gate_ms": _stats(st[:, li, 3])[0],
                        "moe_other_ms": _stats(other[:, li])[0],
                        "moe_ms": _stats(st[:, li, 4])[0],
                    }
                )
        else:
            row["non_moe_ms"] = lat[0]
        tq = _stats(tps)
        peaks = [r["peak_bytes"] for r in ranks]
        row.update(
            tokens_per_s_q25=tq[1],
            tokens_per_s_q75=tq[2],
            moe_layers=layers,
            instrumented_latency_ms=_stats(inst)[0],
            weights_mb=res["weights_bytes"] / 2**20,
            peak_mem_mb=float(np.nanmax(peaks)) / 2**20 if not np.all(np.isnan(peaks)) else np.nan,
            peak_mem_source=res["peak_source"],
            params=res["params_total"],
            params_per_rank=res["params_per_rank"],
            local_experts=max(res["local_experts"] or [1]),
            batch_size=b,
            seq_len=t,
            device=spec["device"],
            backend="nccl" if spec["device"] == "cuda" else "gloo",
            dtype=spec["dtype"],
            threads_per_rank=spec["threads"],
            oversubscribed=spec["device"] == "cpu" and world * spec["threads"] > (os.cpu_count() or 1),
            reps=spec["reps"],
            warmup=spec["warmup"],
            checkpoint=m.checkpoint,
        )
        rows.append(row)
    return rows, layer_rows


def _machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    try:
        info["deepspeed"] = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - validate() refused already
        info["deepspeed"] = None
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def run_profile(
    models: list[ProfileModel], cfg: ProfileConfig, out_dir: str | Path, resume: bool = False, log=print
) -> pd.DataFrame:
    """Profile every model at every rank count; write profile.csv / profile_layers.csv / profile.json; return the
    summary table. `resume`: reuse a group's raw result when it was made from the same spec and code."""
    device = cfg.resolved_device()
    validate(models, cfg, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.ranks[-1])
    dtype = cfg.resolved_dtype(device)
    code = _code_hash()
    rows, layer_rows, groups = [], [], []
    load = {"before": os.getloadavg()} if hasattr(os, "getloadavg") else {}
    t_all = time.perf_counter()
    batches = [[m] for m in models] if cfg.isolate else [models]
    for r in cfg.ranks:
        for batch in batches:
            name = f"r{r}" + (f"-{batch[0].label}" if cfg.isolate else "")
            name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
            spec = {
                "models": [
                    {**m.to_spec(), "seed": cfg.seed, "hash": checkpoint.checkpoint_hash(m.checkpoint)}
                    if m.checkpoint
                    else {**m.to_spec(), "seed": cfg.seed}
                    for m in batch
                ],
                "ranks": r,
                "ep_size": cfg.ep_for(r),
                "batch_size": cfg.batch_size,
                "seq_len": cfg.seq_len,
                "warmup": cfg.warmup,
                "reps": cfg.reps,
                "device": device,
                "dtype": dtype,
                "threads": threads,
                "memory": cfg.memory,
                "seed": cfg.seed,
                "code": code,
            }
            doc = _reuse(out, name, spec) if resume else None
            t0 = time.perf_counter()
            if doc is None:
                log(f"[profile] {r} rank(s), ep_size {cfg.ep_for(r)}: {', '.join(m.label for m in batch)}")
                doc = launch_group(spec, name, out, cfg.timeout_s)
            else:
                log(f"[profile] {name}: reusing {out / 'raw' / (name + '.json')}")
            groups.append({"name": name, "ranks": r, "seconds": round(time.perf_counter() - t0, 2)})
            rs, ls = summarize(doc, batch)
            rows += rs
            layer_rows += ls
    if "before" in load:
        load["after"] = os.getloadavg()
    table = pd.DataFrame(rows)
    table = table[[c for c in COLUMNS if c in table.columns]]
    checkpoint.atomic_write_text(out / "profile.csv", table.to_csv(index=False))
    checkpoint.atomic_write_text(out / "profile_layers.csv", pd.DataFrame(layer_rows).to_csv(index=False))
    meta = {
        "protocol": dataclasses.asdict(cfg) | {"device": device, "dtype": dtype, "threads": threads},
        "machine": _machine(),
        "load_average": load,
        "groups": groups,
        "seconds": round(time.perf_counter() - t_all, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "columns": COLUMNS,
    }
    checkpoint.atomic_write_text(out / "profile.json", json.dumps(meta, indent=2, default=str))
    return table


def read_layers(out_dir: str | Path) -> pd.DataFrame:
    """profile_layers.csv of a profile folder (empty when no model has MoE layers)."""
    path = Path(out_dir) / "profile_layers.csv"
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _reuse(out: Path, name: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    res, old = out / "raw" / f"{name}.json", out / "raw" / f"{name}.spec.json"
    if not (res.is_file() and old.is_file()):
        return None
    prev = json.loads(old.read_text())
    prev.pop("result", None)
    return json.loads(res.read_text()) if prev == spec else None


__all__ = [
    "COLUMNS",
    "ProfileConfig",
    "ProfileModel",
    "RankFailure",
    "checkpoint_models",
    "label_for",
    "launch_group",
    "max_ranks",
    "preset_models",
    "read_layers",
    "run_profile",
    "summarize",
    "validate",
]
