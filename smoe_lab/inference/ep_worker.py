"""One rank of an expert-parallel inference profile: `python -m smoe_lab.inference.ep_worker SPEC.json`.

Started by `smoe_lab.inference.ep_profile` (never by hand): the parent sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR=127.0.0.1 / MASTER_PORT and DS_ACCELERATOR, and writes SPEC.json (plain JSON, nothing unpickled). Every
rank builds every model of the spec with DeepSpeed-MoE layers (`moe_impl: deepspeed`, this rank's E / ep_size
experts; a checkpoint through `smoe_lab.ds.convert.load_as_deepspeed`), joins the expert-parallel groups
(`MoE.set_deepspeed_parallelism`, as `deepspeed.initialize` does), feeds its own batch of random token ids
[batch_size, seq_len] (data parallel: every rank a different batch), and runs the protocol:

    warm-up: `warmup` passes per model;
    rounds:  `reps` rounds; in each, every model (order rotated per round) runs one clean pass (whole-model latency:
             barrier, forward, device sync; the pass's latency is the slowest rank's) and one instrumented pass
             (per MoE layer: DeepSpeed's own wall_clock_breakdown timers for the 1st / 2nd all-to-all and the whole
             MOELayer, plus forward hooks on the gate and the experts). Clean and instrumented passes are kept apart
             because DeepSpeed's timers synchronise the device inside the layer on GPUs;
    memory:  one more pass per model for its peak memory (CUDA: the caching allocator's peak above what was
             allocated before, plus the model's own weights; CPU: the model's weights plus the peak of the pass's
             allocations minus frees, from torch.profiler's allocation events).

Rank 0 gathers every rank's numbers (tensor all_gather: gloo on CPU, NCCL on GPU) and writes the raw per-pass,
per-rank arrays to the spec's `result` path as JSON (written to a temporary name, then renamed); the parent
summarises them. All-to-all times are the collective's wall time as DeepSpeed measures it: transfer plus waiting
for the slowest rank of the expert-parallel group to arrive.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load
from ..config import ModelConfig
from ..ds.convert import load_as_deepspeed
from ..ds.engine import init_distributed
from ..model import GPT

STAGES = ("a2a_dispatch", "a2a_combine", "experts", "gate", "moe")  # per MoE layer, ms
A2A_CLOCK: list[list[float]] | None = None  # while armed on a CPU: [enter, exit] host times of every all-to-all


def hook_all_to_all() -> None:
    """Record when this rank enters and leaves each of DeepSpeed's all-to-alls (CLOCK_MONOTONIC: one clock for every
    process of the host), so the parent can split the collective's time into waiting for the group's last rank to
    arrive and the exchange after it did. CPU only: on a GPU the host times are not the device's."""
    from deepspeed.moe import sharded_moe

    original = sharded_moe._AllToAll.forward

    def forward(ctx, group, input):
        if A2A_CLOCK is None:
            return original(ctx, group, input)
        enter = time.clock_gettime(time.CLOCK_MONOTONIC)
        out = original(ctx, group, input)
        A2A_CLOCK.append([enter, time.clock_gettime(time.CLOCK_MONOTONIC)])
        return out

    sharded_moe._AllToAll.forward = staticmethod(forward)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Start/stop marks: CUDA events on a GPU (no host sync inside the forward), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return float(start.elapsed_time(end)) if self.cuda else 1000.0 * (end - start)


class LayerProbe:
    """Forward hooks on one DeepSpeed MoE layer's gate and experts; DeepSpeed's timers for the all-to-alls."""

    def __init__(self, layer, clock: _Clock):
        from deepspeed.moe.sharded_moe import FIRST_ALLTOALL_TIMER, MOE_TIMER, SECOND_ALLTOALL_TIMER

        self.moe = layer.deepspeed_moe  # deepspeed.moe.sharded_moe.MOELayer
        self.timer_names = (FIRST_ALLTOALL_TIMER, SECOND_ALLTOALL_TIMER, MOE_TIMER)
        self.clock = clock
        self.active = False
        self.marks: dict[str, list] = {"gate": [], "experts": []}
        for name, module in (("gate", self.moe.gate), ("experts", self.moe.experts)):
            module.register_forward_pre_hook(self._start(name))
            module.register_forward_hook(self._stop(name))

    def _start(self, name: str):
        def hook(module, args):
            if self.active:
                self.marks[name].append([self.clock.mark(), None])

        return hook

    def _stop(self, name: str):
        def hook(module, args, output):
            if self.active:
                self.marks[name][-1][1] = self.clock.mark()

        return hook

    def arm(self, on: bool) -> None:
        self.active = on
        self.moe.wall_clock_breakdown = on
        for n in self.timer_names:
            self.moe.timers(n).reset()
        for v in self.marks.values():
            v.clear()

    def read(self, expert_parallel: bool) -> list[float]:
        """ms of [a2a_dispatch, a2a_combine, experts, gate, moe] in the last armed pass (NaN: no all-to-all)."""

        def total(name: str) -> float:
            return sum(self.clock.ms(a, b) for a, b in self.marks[name])

        nan = float("nan")
        a2a = (self.moe.time_falltoall, self.moe.time_salltoall) if expert_parallel else (nan, nan)
        return [float(a2a[0]), float(a2a[1]), total("experts"), total("gate"), float(self.moe.time_moe)]


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_model(entry: dict[str, Any], ep_size: int, device: torch.device, dtype: torch.dtype):
    """A model of the spec on `device` in `dtype`, with DeepSpeed-MoE layers holding this rank's experts (dense models
    stay dense). A checkpoint is loaded on the CPU and moved; on a GPU a preset is built on the meta device and
    initialised in place (GPT-2's init from the device's RNG, seeded): a 354M+128e model never sits on the host."""
    if entry.get("checkpoint"):
        model = load_as_deepspeed(entry["checkpoint"], ep_size) if entry["experts"] > 1 else load(entry["checkpoint"])
        model = model.to(device=device, dtype=dtype)
    else:
        cfg = ModelConfig.from_dict(entry["config"])
        if cfg.is_moe:
            cfg = cfg.replace(moe_impl="deepspeed", ep_size=ep_size)
        if device.type == "cpu":  # (the meta route below costs seconds of one-time setup: not worth it on a CPU)
            model = GPT(cfg, seed=entry.get("seed", 0)).to(dtype)
        else:
            with torch.device("meta"):
                model = GPT(cfg)  # shapes only
            model = model.to(dtype).to_empty(device=device)
            if cfg.tie_embeddings:  # to_empty gives every parameter its own storage: tie again
                model.lm_head.weight = model.transformer.wte.weight
            torch.manual_seed(entry.get("seed", 0))
            with torch.device(device), torch.no_grad():
                model.init_weights(None)
    for layer in model.moe_layers():
        layer.set_deepspeed_parallelism()  # joins (or creates) the ep_size_<n> expert-parallel group
        layer.disable_telemetry()
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes of this rank's parameters and buffers (tied weights once)."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def peak_memory_bytes(model, idx: torch.Tensor, device: torch.device) -> tuple[float, str]:
    """Peak bytes of one forward pass of `model` alone (its weights included) and how it was measured."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            model(idx)
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - before + weight_bytes(model)), "cuda-allocator"
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.no_grad():
                model(idx)
        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:  # every allocation (+bytes) and free (-bytes) of the pass, with its time
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
        live = peak = 0
        for _, size in sorted(events):
            live += size
            peak = max(peak, live)
        return float(weight_bytes(model) + idx.numel() * idx.element_size() + peak), "cpu-profiler"
    except Exception:  # torch.profiler's event tree is semi-private: report unavailable rather than a wrong number
        return float("nan"), "unavailable"


def _timed_pass(model, idx: torch.Tensor, device: torch.device) -> float:
    torch.distributed.barrier()
    _sync(device)
    t0 = time.perf_counter()
    model(idx)
    _sync(device)
    return 1000.0 * (time.perf_counter() - t0)


def profile_models(models: list, probes: list[list[LayerProbe]], spec: dict, idx: torch.Tensor, device) -> dict:
    """Run the protocol on this rank -> per model: clean [reps], instrumented [reps], stages [reps, L, 5]."""
    global A2A_CLOCK
    ep = spec["ep_size"]
    host_clock = ep > 1 and device.type == "cpu"
    out = [{"clean": [], "instrumented": [], "stages": [], "a2a_clock": []} for _ in models]
    with torch.no_grad():
        for m in models:
            for _ in range(spec["warmup"]):
                torch.distributed.barrier()
                m(idx)
        for r in range(spec["reps"]):
            for k in range(len(models)):
                i = (k + r) % len(models)  # rotate the order every round
                m = models[i]
                out[i]["clean"].append(_timed_pass(m, idx, device))
                for p in probes[i]:
                    p.arm(True)
                A2A_CLOCK = [] if host_clock else None
                out[i]["instrumented"].append(_timed_pass(m, idx, device))
                out[i]["stages"].append([p.read(ep > 1) for p in probes[i]])
                n_calls = 2 * len(probes[i])
                clock = A2A_CLOCK if host_clock and len(A2A_CLOCK) == n_calls else [[float("nan")] * 2] * n_calls
                out[i]["a2a_clock"].append(clock)
                A2A_CLOCK = None
                for p in probes[i]:
                    p.arm(False)
    return out


def _gather(values: list[float], device: torch.device) -> list[list[float]]:
    """all_gather of one float list per rank -> [world][len]."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t)
    return [p.cpu().tolist() for p in parts]


def main(spec_path: str) -> None:
    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    if spec["device"] == "cuda":  # this rank's GPU first, so that NCCL's communicators bind to it
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    init_distributed(shm_allreduce=False)  # no all-reduce here: skips DeepSpeed's shm op build (~30 s when fresh)
    hook_all_to_all()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    seconds = {"start": time.perf_counter() - t_start}
    if world != spec["ranks"]:
        raise RuntimeError(f"launched with WORLD_SIZE={world}, spec wants {spec['ranks']} ranks")
    dtype = _dtype(spec["dtype"])
    clock = _Clock(device)
    models, probes, meta = [], [], []
    for entry in spec["models"]:
        m = build_model(entry, spec["ep_size"], device, dtype)
        models.append(m)
        probes.append([LayerProbe(layer, clock) for layer in m.moe_layers()])
        per_rank = sum(p.numel() for p in m.parameters())
        local_expert_params = sum(p.numel() for layer in m.moe_layers() for p in layer.local_experts.parameters())
        meta.append(
            {
                "params_per_rank": per_rank,
                "params_total": per_rank + (spec["ep_size"] - 1) * local_expert_params,
                "weights_bytes": weight_bytes(m),
                "local_experts": [layer.num_local_experts for layer in m.moe_layers()],
                "block_size": m.config.block_size,
            }
        )
    seconds["build"] = time.perf_counter() - t_start - sum(seconds.values())
    g = torch.Generator().manual_seed(1_000_003 * spec["seed"] + rank)  # every rank its own batch
    vocab = min(m.config.vocab_size for m in models)
    idx = torch.randint(0, vocab, (spec["batch_size"], spec["seq_len"]), generator=g).to(device)
    runs = profile_models(models, probes, spec, idx, device)
    seconds["profile"] = time.perf_counter() - t_start - sum(seconds.values())
    results = []
    for m, run, info, layer_probes in zip(models, runs, meta, probes):
        peak, source = peak_memory_bytes(m, idx, device) if spec["memory"] else (float("nan"), "off")
        stages = torch.tensor(run["stages"], dtype=torch.float64).reshape(-1).tolist() if layer_probes else []
        clock = torch.tensor(run["a2a_clock"], dtype=torch.float64).reshape(-1).tolist() if layer_probes else []
        gathered = _gather(run["clean"] + run["instrumented"] + stages + clock + [peak], device)
        results.append({**info, "moe_layers": len(layer_probes), "peak_source": source, "gathered": gathered})
    seconds["memory+gather"] = time.perf_counter() - t_start - sum(seconds.values())
    print(f"[rank {rank}] seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)
    if rank == 0:
        doc = {"spec": {k: v for k, v in spec.items() if k != "models"}, "models": []}
        n = spec["reps"]
        for entry, res in zip(spec["models"], results):
            layers = res["moe_layers"]
            per_rank = []
            k_st, k_clock = n * layers * len(STAGES), n * layers * 4
            for row in res.pop("gathered"):
                st = row[2 * n : 2 * n + k_st]
                clock = row[2 * n + k_st : 2 * n + k_st + k_clock]
                per_rank.append(
                    {
                        "clean_ms": row[:n],
                        "instrumented_ms": row[n : 2 * n],
                        "stages_ms": np.array(st).reshape(n, layers, len(STAGES)).tolist() if layers else [],
                        "a2a_clock_s": np.array(clock).reshape(n, layers, 2, 2).tolist() if layers else [],
                        "peak_bytes": row[-1],
                    }
                )
            doc["models"].append({"label": entry["label"], **res, "ranks": per_rank})
        doc["torch"] = torch.__version__
        doc["seconds"] = seconds
        doc["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        out = Path(spec["result"])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover - run as a subprocess
    main(sys.argv[1])
