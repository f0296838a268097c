"""Calibration: run a model over task data and collect per-MoE-layer router statistics.

What UNCURL and every baseline need is accumulated in float64 over batches, so memory is O(Z^2) per layer,
not O(|T| Z): the router-logit Gram matrix G = H^T H (cosines follow from it), logit sums and squared norms,
top-1 counts before drops (the activation frequencies), processed counts after drops, and optionally a capped
random subsample of raw logits for plots. Padding is masked out. The result is saved as ONE safetensors file
whose metadata holds a manifest (checkpoint hash, task, split, tokens used), reused by every method and every D.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checkpoint import fsync_dir, model_hash
from .router_health import RouterHealth, entropy_and_gate_sums, health_from_sums

FORMAT = "smoe_lab.calibration.v1"


@dataclass
class LayerStats:
    """Router statistics of one MoE layer over the calibration tokens."""

    gram: torch.Tensor  # [Z, Z] float64: sum over tokens of h h^T (h = router logits)
    logit_sum: torch.Tensor  # [Z] float64
    top1_counts: torch.Tensor  # [Z] int64: tokens whose argmax is each expert (before drops)
    processed_counts: torch.Tensor  # [Z] int64: tokens each expert processed (after drops, eval capacity)
    n_tokens: int
    logits_sample: torch.Tensor | None = None  # [n_sample, Z] float32, for plots
    # Top-k routing (Hugging Face decoders, smoe_lab.hf): k choices per token. For top-1 models selected_counts is
    # top1_counts. gate_mass: the routing weights each expert received, summed over tokens (None in old artifacts).
    selected_counts: torch.Tensor | None = None  # [Z] int64: tokens that chose each expert among their top k
    gate_mass: torch.Tensor | None = None  # [Z] float64
    top_k: int = 1
    entropy_sum: float = float("nan")  # sum over tokens of the router softmax's entropy (nats); nan in old artifacts
    gate_sum: float = float("nan")  # sum over tokens of the top-1 probability

    @property
    def num_experts(self) -> int:
        return self.gram.shape[0]

    @property
    def frequencies(self) -> torch.Tensor:
        """[Z] float64: share of each expert in the layer's routing choices (sums to 1).

        Top-1: the share of tokens whose argmax is the expert (the paper's activation frequency). Top-k: each token
        makes k choices, so the share is selected_counts / (k * n_tokens).
        """
        if self.top_k > 1 and self.selected_counts is not None:
            return self.selected_counts.double() / max(self.top_k * self.n_tokens, 1)
        return self.top1_counts.double() / max(self.n_tokens, 1)

    @property
    def gate_shares(self) -> torch.Tensor:
        """[Z] float64: gate mass normalised to sum to 1 (uniform when no mass was recorded at all)."""
        if self.gate_mass is None:
            raise ValueError("this calibration artifact has no gate mass: calibrate the checkpoint again")
        total = float(self.gate_mass.sum())
        z = self.num_experts
        return self.gate_mass.double() / total if total > 0 else torch.full((z,), 1.0 / z, dtype=torch.float64)

    @property
    def logit_norms(self) -> torch.Tensor:
        """[Z] float64: ||H[:, z]|| over the calibration tokens."""
        return self.gram.diagonal().sqrt()

    @property
    def dropped_fraction(self) -> float:
        return 1.0 - float(self.processed_counts.sum()) / max(self.n_tokens, 1)

    @property
    def health(self) -> RouterHealth:
        """Router health of this layer on the calibration tokens (smoe_lab.router_health)."""
        return health_from_sums(self.entropy_sum, self.gate_sum, self.top1_counts, self.processed_counts, self.n_tokens)


@dataclass
class Calibration:
    layers: list[LayerStats]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def experts_per_layer(self) -> list[int]:
        return [s.num_experts for s in self.layers]

    def save(self, path: str | Path) -> Path:
        """One .safetensors file: tensors per layer + the manifest in its metadata. Written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, s in enumerate(self.layers):
            tensors[f"layer{i}.gram"] = s.gram.contiguous()
            tensors[f"layer{i}.logit_sum"] = s.logit_sum.contiguous()
            tensors[f"layer{i}.top1_counts"] = s.top1_counts.contiguous()
            tensors[f"layer{i}.processed_counts"] = s.processed_counts.contiguous()
            tensors[f"layer{i}.n_tokens"] = torch.tensor([s.n_tokens], dtype=torch.int64)
            tensors[f"layer{i}.health_sums"] = torch.tensor([s.entropy_sum, s.gate_sum], dtype=torch.float64)
            if s.logits_sample is not None:
                tensors[f"layer{i}.logits_sample"] = s.logits_sample.contiguous()
            if s.selected_counts is not None:
                tensors[f"layer{i}.selected_counts"] = s.selected_counts.contiguous()
            if s.gate_mass is not None:
                tensors[f"layer{i}.gate_mass"] = s.gate_mass.contiguous()
            tensors[f"layer{i}.top_k"] = torch.tensor([s.top_k], dtype=torch.int64)
        meta = {"format": FORMAT, "manifest": json.dumps(self.manifest, sort_keys=True, default=str)}
        if path.is_dir():
            raise ValueError(f"calibration output {path} is a folder: give a file path (.safetensors)")
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not a calibration artifact (a .safetensors file from calibrate)")
        if not path.is_file():
            raise FileNotFoundError(f"calibration artifact not found: {path} (make one with `smoe-lab calibrate`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a smoe_lab calibration artifact (format {meta.get('format')!r})")
            t = load_file(str(path))
            n_layers = len({k.split(".")[0] for k in t})
            layers = [
                LayerStats(
                    gram=t[f"layer{i}.gram"],
                    logit_sum=t[f"layer{i}.logit_sum"],
                    top1_counts=t[f"layer{i}.top1_counts"],
                    processed_counts=t[f"layer{i}.processed_counts"],
                    n_tokens=int(t[f"layer{i}.n_tokens"][0]),
                    logits_sample=t.get(f"layer{i}.logits_sample"),
                    selected_counts=t.get(f"layer{i}.selected_counts"),
                    gate_mass=t.get(f"layer{i}.gate_mass"),
                    top_k=int(t[f"layer{i}.top_k"][0]) if f"layer{i}.top_k" in t else 1,
                    **_health_sums(t.get(f"layer{i}.health_sums")),
                )
                for i in range(n_layers)
            ]
            manifest = json.loads(meta["manifest"])
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable calibration artifact (truncated or corrupted?): {e}") from None
        except (KeyError, IndexError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{path}: calibration artifact is incomplete or corrupted ({type(e).__name__}: {e})"
            ) from None
        for i, s in enumerate(layers):
            z = s.gram.shape[0] if s.gram.dim() == 2 else -1
            if s.gram.shape != (z, z) or s.top1_counts.shape != (z,) or s.processed_counts.shape != (z,):
                raise ValueError(f"{path}: layer {i} tensors have inconsistent shapes (corrupted artifact)")
        return cls(layers, manifest)


def _health_sums(t: torch.Tensor | None) -> dict[str, float]:
    """entropy_sum / gate_sum from an artifact (nan when it predates them)."""
    if t is None:
        return {}
    return {"entropy_sum": float(t[0]), "gate_sum": float(t[1])}


def _as_batch(item: Any, vocab_size: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A calibration item: LongTensor [B, T] or (idx [B, T], mask [B, T]); validated."""
    idx, mask = (item if isinstance(item, (tuple, list)) else (item, None))[:2]
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2:
        got = f"{type(idx).__name__} {getattr(idx, 'dtype', '')} {tuple(getattr(idx, 'shape', ()))}"
        raise ValueError(f"calibration batches must be LongTensors [B, T], got {got}")
    if idx.shape[1] > block_size:
        raise ValueError(f"calibration batch has T={idx.shape[1]} > block_size={block_size}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        raise ValueError(
            f"calibration token ids must be in [0, {vocab_size}), got [{int(idx.min())}, {int(idx.max())}]"
        )
    if mask is not None and mask.shape != idx.shape:
        raise ValueError(f"calibration mask shape {tuple(mask.shape)} differs from batch shape {tuple(idx.shape)}")
    return idx, mask


@torch.no_grad()
def calibrate(
    model,
    batches: Iterable[Any],
    max_sample: int = 4096,
    seed: int = 0,
    progress: bool = False,
    **manifest: Any,
) -> Calibration:
    """Router statistics of every MoE layer of `model` over `batches` (eval mode: eval capacity factor).

    batches: LongTensors [B, T] or (idx, mask) pairs (mask True for real tokens). max_sample raw logit rows per
    layer are kept for plots, chosen uniformly at random by reservoir sampling (seeded). Logit recording is switched
    on for the duration (a model whose `record_logits` is off would otherwise give an all-zero Gram matrix) and
    restored afterwards.
    """
    layers = model.moe_layers()
    if not layers:
        raise ValueError("calibrate: the model has no MoE layers (dense model)")
    cfg = model.config
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    z = [m.num_experts for m in layers]
    gram = [torch.zeros(e, e, dtype=torch.float64) for e in z]
    lsum = [torch.zeros(e, dtype=torch.float64) for e in z]
    top1 = [torch.zeros(e, dtype=torch.int64) for e in z]
    proc = [torch.zeros(e, dtype=torch.int64) for e in z]
    chosen = [torch.zeros(e, dtype=torch.int64) for e in z]
    mass = [torch.zeros(e, dtype=torch.float64) for e in z]
    top_k = [int(getattr(m, "top_k", 1)) for m in layers]
    ent_gate = [[0.0, 0.0] for _ in z]  # sums of per-token router entropy and top-1 probability
    samples: list[torch.Tensor | None] = [None] * len(layers)
    seen = [0] * len(layers)
    gen = torch.Generator().manual_seed(seed)
    n_tokens = 0
    t0 = time.perf_counter()
    recording = [getattr(m, "record_logits", True) for m in layers]
    try:
        for m in layers:
            m.record_logits = True
        for item in tqdm(batches, desc="calibrate", disable=not progress):
            idx, mask = _as_batch(item, cfg.vocab_size, cfg.block_size)
            model(idx.to(device), mask=None if mask is None else mask.to(device))
            real = int(mask.sum()) if mask is not None else idx.numel()
            n_tokens += real
            expect = None if getattr(model, "hf_family", None) is not None else real  # HF decoders may add tokens (BOS)
            _accumulate(layers, expect, gram, lsum, top1, proc, chosen, mass, ent_gate, samples, seen, max_sample, gen)
    finally:
        for m, flag in zip(layers, recording):
            m.record_logits = flag
    model.train(was_training)
    if n_tokens == 0:
        raise ValueError("calibration data is empty: no tokens were seen (check the task split and the batches)")
    stats = [
        LayerStats(
            gram[i],
            lsum[i],
            top1[i],
            proc[i],
            n_tokens,
            samples[i] if max_sample > 0 else None,
            selected_counts=chosen[i],
            gate_mass=mass[i],
            top_k=top_k[i],
            entropy_sum=ent_gate[i][0],
            gate_sum=ent_gate[i][1],
        )
        for i in range(len(layers))
    ]
    info = {
        "model_hash": model_hash(model),
        "checkpoint": getattr(model, "checkpoint_path", None),
        "experts_per_layer": z,
        "top_k": top_k,
        "tokens": n_tokens,
        "capacity_factor": cfg.capacity_factor_eval,
        "seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **manifest,
    }
    return Calibration(stats, info)


def _selections(t) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected counts [Z] int64, gate mass [Z] float64) of one forward's telemetry.

    Top-k telemetry (smoe_lab.hf) carries both; for the native top-1 layer they are the argmax counts and the
    summed softmax probability of each token's argmax expert.
    """
    if getattr(t, "selected_counts", None) is not None:
        return t.selected_counts.cpu(), t.gate_mass.double().cpu()
    p = t.router_probs.double().cpu()  # [N_real, Z]
    top = p.max(1)
    return t.routed_counts.cpu(), torch.zeros(p.shape[1], dtype=torch.float64).index_add_(0, top.indices, top.values)


def _accumulate(layers, expect, gram, lsum, top1, proc, chosen, mass, ent_gate, samples, seen, max_sample: int, gen):
    """Add one batch's router telemetry to every layer's running statistics; `expect`: the number of unpadded tokens
    every layer must have recorded (None: not checked)."""
    for i, m in enumerate(layers):
        t = m.telemetry
        h = t.router_logits.double().cpu()  # [N_real, Z]
        if expect is not None and h.shape[0] != expect:
            raise ValueError(f"MoE layer {i} recorded {h.shape[0]} router-logit rows for {expect} tokens")
        gram[i] += h.T @ h
        lsum[i] += h.sum(0)
        top1[i] += t.routed_counts.cpu()
        proc[i] += t.processed_counts.cpu()
        c, g = _selections(t)
        chosen[i] += c
        mass[i] += g
        ent, gate = entropy_and_gate_sums(t.router_probs)
        ent_gate[i][0] += ent
        ent_gate[i][1] += gate
        samples[i], seen[i] = _reservoir(samples[i], seen[i], h.float(), max_sample, gen)


def _reservoir(
    current: torch.Tensor | None, seen: int, rows: torch.Tensor, cap: int, gen: torch.Generator
) -> tuple[torch.Tensor | None, int]:
    """Keep a uniform random sample of at most `cap` rows of a stream (Algorithm R, vectorised per batch)."""
    if cap <= 0:
        return None, seen + rows.shape[0]
    if current is None:
        current = rows.new_empty(0, rows.shape[1])
    room = cap - current.shape[0]
    take = rows[:room]
    current = torch.cat([current, take])
    rest = rows[room:] if room > 0 else rows
    base = seen + take.shape[0]
    if rest.shape[0]:
        # item k of the rest (overall index base + k) replaces a random slot with probability cap / (base + k + 1)
        j = (torch.rand(rest.shape[0], generator=gen) * (base + torch.arange(1, rest.shape[0] + 1))).long()
        hit = j < cap
        current = current.clone()
        for k in torch.nonzero(hit).squeeze(1).tolist():
            current[j[k]] = rest[k]
    return current, seen + rows.shape[0]


def check_compatible(cal: Calibration, model) -> None:
    """Raise ValueError unless `cal` was made from exactly this model (same weights)."""
    want = cal.manifest.get("model_hash")
    have = model_hash(model)
    if want != have:
        raise ValueError(
            f"calibration artifact was made from another checkpoint (model hash {str(want)[:12]}..., "
            f"this model {have[:12]}...): calibrate this checkpoint again"
        )
