"""Model-level expert reduction: UNCURL (Algorithm 1) and every baseline, with physical compaction.

Each method decides, per MoE layer, a partition of the Z old experts into D groups with one reference (centre)
expert per group; prune-type methods keep the centre alone, merge-type methods align every member to the centre
(Hungarian weight matching) and average with activation-frequency weights. The returned model is NEW and holds
exactly D experts per layer (parameter count and checkpoint size drop); its config records the per-layer counts
and the old -> new expert map.

    uncurl      router-logit similarity S = (1+cos)/2 -> spectral embedding -> k-means into D clusters; the most
                frequently selected member is the centre; align + frequency-weighted merge     (paper, Alg. 1)
    freq_prune  keep the D most frequently selected experts per layer                        (Table 1 baseline)
    freq_merge  top-D by frequency are centres, every other expert joins its most similar centre by S, merge
                                                                                             (Table 3 baseline)
    mcsmoe      dominant experts chosen globally across layers by frequency (each layer's top expert first, then
                the most frequent of the rest anywhere), D per layer on average; others join the most similar
                dominant expert of their own layer; align + merge                            (Table 4, MC-SMoE)
    random      keep D experts per layer chosen at random (seeded)                           (sanity baseline)
    hybrid      freq_prune on the first MoE layer, uncurl on the others                      (the paper's Sec 6.3)

Router options: reinit (the paper's default: fresh normal(0, 0.02) rows - the model's router_init_std -, seeded;
train them with router-only warm-up), merge (frequency-weighted average of each group's router rows, so the reduced
model runs before finetuning), keep (the centre's row; for pruning, the surviving rows).
"""

from __future__ import annotations

import resource
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..calibrate import Calibration, calibrate, check_compatible
from ..model import GPT
from ..router_health import FIELDS as HEALTH_FIELDS
from ..router_health import RouterHealth, specialisation_warning
from .align import ExpertWeights, align_pairs, permute_expert
from .merge import merge_experts, normalize_weights, stack_experts, unstack_experts
from .similarity import similarity_from_gram
from .spectral import cluster_silhouette, eigengap, kmeans_labels, spectral_embedding
from .stability import cluster_stability

METHODS = ("uncurl", "freq_prune", "freq_merge", "mcsmoe", "random", "hybrid")
ROUTER_OPTIONS = ("reinit", "merge", "keep")
PRUNE_METHODS = ("freq_prune", "random")


@dataclass
class LayerPlan:
    """How one layer is reduced: labels [Z] (new index per old expert, -1 = dropped) and centres [D] (old index)."""

    labels: np.ndarray
    centres: list[int]
    merge: bool
    method: str
    eigenvalues: np.ndarray | None = None
    embedding: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class LayerReport:
    layer: int  # MoE layer index in depth order
    block: int  # transformer block index
    method: str
    experts_before: int
    experts_after: int
    labels: np.ndarray  # [Z] new expert index of each old expert (-1 = dropped)
    frequencies: np.ndarray  # [Z] top-1 share on the calibration data
    centres: list[int]  # [D] old index of each new expert's reference expert
    similarity: np.ndarray  # [Z, Z]
    eigenvalues: np.ndarray | None  # [Z] Laplacian spectrum (uncurl)
    embedding: np.ndarray | None  # [Z, D] spectral embedding F (uncurl)
    eigengap: float
    silhouette: float
    stability: float
    seconds: dict[str, float]
    health: RouterHealth | None = None  # the base layer's router health on the calibration tokens

    def summary(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "block": self.block,
            "method": self.method,
            "Z": self.experts_before,
            "D": self.experts_after,
            "centres": self.centres,
            "cluster_sizes": np.bincount(self.labels[self.labels >= 0], minlength=self.experts_after).tolist(),
            "kept_frequency": float(self.frequencies[self.centres].sum()),
            "eigengap": self.eigengap,
            "silhouette": self.silhouette,
            "stability": self.stability,
            **{f"router_{k}": round(getattr(self.health, k), 4) for k in HEALTH_FIELDS if self.health is not None},
            **{f"s_{k}": round(v, 4) for k, v in self.seconds.items()},
        }


@dataclass
class ReductionReport:
    method: str
    router: str
    seed: int
    num_experts: list[int]
    layers: list[LayerReport]
    seconds: dict[str, float]
    peak_rss_mb: float
    calibration: dict[str, Any]
    frequency: str = "selection"  # which per-expert weights the methods used (layer_frequencies)
    warning: str | None = None  # set when the base model's routers did not specialise (router_health)

    def summary(self) -> list[dict[str, Any]]:
        return [lr.summary() for lr in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "router": self.router,
            "seed": self.seed,
            "num_experts": self.num_experts,
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "calibration": self.calibration,
            "frequency": self.frequency,
            "warning": self.warning,
            "layers": [
                {**lr.summary(), "labels": lr.labels.tolist(), "frequencies": lr.frequencies.tolist()}
                for lr in self.layers
            ],
        }


# -- per-layer planning (pure: statistics in, partition out) -------------------------------------------------------
def _top_by_frequency(freq: np.ndarray, d: int) -> list[int]:
    """Indices of the d most frequent experts; ties go to the lower index. Sorted by index."""
    order = np.lexsort((np.arange(len(freq)), -freq))  # primary: -freq, secondary: index
    return sorted(int(i) for i in order[:d])


def _prune_plan(centres: list[int], z: int, method: str) -> LayerPlan:
    labels = np.full(z, -1, dtype=np.int64)
    labels[centres] = np.arange(len(centres))
    return LayerPlan(labels, list(centres), merge=False, method=method)


def _assign_to_centres(S: np.ndarray, centres: list[int], method: str) -> LayerPlan:
    """Every expert joins the centre it is most similar to (centres join themselves)."""
    c = np.asarray(centres)
    labels = np.argmax(S[:, c], axis=1).astype(np.int64)  # [Z]
    labels[c] = np.arange(len(c))
    return LayerPlan(labels, list(centres), merge=True, method=method)


def plan_uncurl(S: np.ndarray, freq: np.ndarray, d: int, seed: int = 0, n_init: int = 10) -> LayerPlan:
    """Algorithm 1 lines 2-11: spectral clusters of S; each cluster's centre is its most frequent member."""
    t0 = time.perf_counter()
    F, ev = spectral_embedding(S, d)  # [Z, D], [Z]
    t1 = time.perf_counter()
    labels = kmeans_labels(F, d, seed=seed, n_init=n_init)  # [Z]
    t2 = time.perf_counter()
    centres = []
    for k in range(d):
        members = np.flatnonzero(labels == k)
        centres.append(int(members[np.argmax(freq[members])]))  # argmax takes the lowest index on ties
    plan = LayerPlan(labels, centres, merge=True, method="uncurl", eigenvalues=ev, embedding=F)
    plan.seconds = {"eigen": t1 - t0, "kmeans": t2 - t1}
    return plan


def plan_freq_prune(freq: np.ndarray, d: int) -> LayerPlan:
    return _prune_plan(_top_by_frequency(freq, d), len(freq), "freq_prune")


def plan_random(z: int, d: int, rng: np.random.Generator) -> LayerPlan:
    return _prune_plan(sorted(int(i) for i in rng.choice(z, size=d, replace=False)), z, "random")


def plan_freq_merge(S: np.ndarray, freq: np.ndarray, d: int) -> LayerPlan:
    return _assign_to_centres(S, _top_by_frequency(freq, d), "freq_merge")


def mcsmoe_dominants(freqs: list[np.ndarray], budget: int) -> list[list[int]]:
    """MC-SMoE's global choice of dominant experts: each layer's most frequent first, then the most frequent of
    the rest across all layers (frequency = share of that layer's tokens) until `budget` experts are chosen."""
    n_layers = len(freqs)
    if budget < n_layers:
        raise ValueError(f"mcsmoe needs at least one expert per layer: budget {budget} < {n_layers} layers")
    chosen = [{int(np.lexsort((np.arange(len(f)), -f))[0])} for f in freqs]
    pool = [(-float(f[z]), li, z) for li, f in enumerate(freqs) for z in range(len(f)) if z not in chosen[li]]
    for _, li, z in sorted(pool)[: budget - n_layers]:
        chosen[li].add(z)
    return [sorted(c) for c in chosen]


def layer_method(method: str, layer: int) -> str:
    """The per-layer method a model-level method uses on MoE layer `layer` (hybrid: freq_prune on the first, uncurl
    on the others; every other method is the same on every layer). The one place the hybrid rule lives."""
    if method == "hybrid":
        return "freq_prune" if layer == 0 else "uncurl"
    return method


def plan_layer(
    S: np.ndarray, freq: np.ndarray, method: str, d: int, layer: int, seed: int = 0, n_init: int = 10
) -> LayerPlan:
    """The partition of MoE layer `layer` for a per-layer method (everything but mcsmoe) from S [Z, Z] and
    frequencies [Z]. A pure function of its arguments: `random` draws from a generator seeded by (seed, layer), so
    a layer's choice does not depend on the other layers (the cluster explorer plans one layer alone)."""
    m = layer_method(method, layer)
    if m == "uncurl":
        return plan_uncurl(S, freq, d, seed=seed, n_init=n_init)
    if m == "freq_prune":
        return plan_freq_prune(freq, d)
    if m == "freq_merge":
        return plan_freq_merge(S, freq, d)
    if m == "random":
        return plan_random(len(freq), d, np.random.default_rng([seed, layer]))
    raise ValueError(f"plan_layer: {method!r} is not a per-layer method (mcsmoe plans all layers together)")


def plan_layers(
    sims: list[np.ndarray], freqs: list[np.ndarray], method: str, targets: list[int], seed: int = 0, n_init: int = 10
) -> list[LayerPlan]:
    """The partition of every MoE layer for `method` from similarities S [Z, Z] and frequencies [Z] per layer.

    Pure (no weights touched): the notebooks use it to show what a method would do before reducing anything.
    """
    if method not in METHODS:
        raise ValueError(f"unknown reduction method {method!r}; known: {list(METHODS)}")
    if method == "mcsmoe":
        dominants = mcsmoe_dominants(freqs, sum(targets))
        return [_assign_to_centres(S, dom, "mcsmoe") for S, dom in zip(sims, dominants)]
    return [plan_layer(S, f, method, d, i, seed, n_init) for i, (S, f, d) in enumerate(zip(sims, freqs, targets))]


# -- weights -------------------------------------------------------------------------------------------------------
def layer_experts(layer) -> list[ExpertWeights]:
    """The layer's experts, one NamedTuple each (a Hugging Face layer gives its own layout, see smoe_lab.hf)."""
    if hasattr(layer, "expert_weights"):
        return layer.expert_weights()
    e = layer.experts
    return unstack_experts(e.w_in.detach(), e.b_in.detach(), e.w_out.detach(), e.b_out.detach())


def merge_groups(
    experts: list[ExpertWeights], freq: np.ndarray, plan: LayerPlan, workers: int
) -> tuple[list[ExpertWeights], float, float]:
    """New experts of a layer per its plan -> (experts [D], align seconds, merge seconds).

    Every non-centre member of every group is aligned to its group's centre in one parallel batch (align_pairs),
    then each group is frequency-averaged; a group of one (or a pruning plan) keeps its centre as is.
    """
    groups = [[int(m) for m in np.flatnonzero(plan.labels == d)] for d in range(len(plan.centres))]
    jobs = [(m, c) for members, c in zip(groups, plan.centres) if plan.merge for m in members if m != c]
    t0 = time.perf_counter()
    perms = align_pairs([(experts[m], experts[c]) for m, c in jobs], workers=workers)
    t1 = time.perf_counter()
    aligned = {m: permute_expert(experts[m], p) for (m, _), p in zip(jobs, perms)}
    out = []
    for members, centre in zip(groups, plan.centres):
        if not plan.merge or len(members) == 1:
            out.append(type(experts[centre])(*(t.clone() for t in experts[centre])))
        else:
            out.append(merge_experts([aligned.get(m, experts[m]) for m in members], freq[members]))
    return out, t1 - t0, time.perf_counter() - t1


def _new_router(
    old_w: torch.Tensor, freq: np.ndarray, plan: LayerPlan, option: str, seed: int, std: float = 0.02
) -> torch.Tensor:
    """Router weight [D, d_model] of the reduced layer (reinit: normal(0, std), the model's router init rule)."""
    d = len(plan.centres)
    if option == "reinit":
        g = torch.Generator().manual_seed(seed)
        return torch.empty(d, old_w.shape[1]).normal_(0.0, std, generator=g).to(old_w.dtype)
    if option == "keep":
        return old_w[plan.centres].clone()
    rows = []
    for k in range(d):
        members = np.flatnonzero(plan.labels == k)
        w = normalize_weights(freq[members], len(members)).to(old_w.dtype)  # [m]
        rows.append(w @ old_w[members])
    return torch.stack(rows)


def _fill_layer(new_layer, experts: list, router_weight: torch.Tensor) -> None:
    """Write a reduced layer's experts [D] and router weight [D, d_model] into the new model's layer."""
    if hasattr(new_layer, "set_experts"):  # a Hugging Face layer (smoe_lab.hf) writes its own layout
        new_layer.set_experts(experts, router_weight)
        return
    w_in, b_in, w_out, b_out = stack_experts(experts)
    with torch.no_grad():
        new_layer.experts.w_in.copy_(w_in)
        new_layer.experts.b_in.copy_(b_in)
        new_layer.experts.w_out.copy_(w_out)
        new_layer.experts.b_out.copy_(b_out)
        new_layer.router.weight.copy_(router_weight)


FREQUENCIES = ("selection", "gate_mass")


def layer_frequencies(stats, frequency: str = "selection") -> np.ndarray:
    """[Z] expert weights of one layer that every method ranks and averages with (they sum to 1).

    selection: the share of the layer's routing selections (top-1: the activation frequency of the paper; top-k:
    each token's k choices count once each, so the shares are over k * tokens). gate_mass: the share of the summed
    routing weights each expert received (REAP-style saliency; for top-1 the softmax probability of the argmax).
    """
    if frequency == "selection":
        return stats.frequencies.numpy()
    if frequency == "gate_mass":
        if stats.gate_mass is None:
            raise ValueError("this calibration artifact has no gate mass: calibrate the checkpoint again")
        return stats.gate_shares.numpy()
    raise ValueError(f"unknown frequency {frequency!r}; known: {list(FREQUENCIES)}")


def _compose_maps(prev: list[list[int]] | None, labels: list[np.ndarray]) -> list[list[int]]:
    """Provenance across repeated reductions: original expert -> newest index (-1 once dropped)."""
    if prev is None:
        return [lab.tolist() for lab in labels]
    return [[int(lab[v]) if v >= 0 else -1 for v in p] for p, lab in zip(prev, labels)]


# -- the public entry point ----------------------------------------------------------------------------------------
def _targets(num_experts: int | list[int], zs: list[int], method: str) -> list[int]:
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, list, tuple)):
        raise ValueError(f"num_experts must be an int or a per-layer list, got {num_experts!r}")
    ds = [num_experts] * len(zs) if isinstance(num_experts, int) else list(num_experts)
    if len(ds) != len(zs):
        raise ValueError(f"num_experts lists {len(ds)} layers, the model has {len(zs)} MoE layers")
    for i, (d, z) in enumerate(zip(ds, zs)):
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= z:
            raise ValueError(f"num_experts for MoE layer {i} must be in [1, Z={z}], got {d!r}")
    return ds


def reduce_model(
    model,
    method: str,
    num_experts: int | list[int],
    calibration: Calibration | Iterable[Any],
    seed: int = 0,
    router: str = "reinit",
    workers: int = 1,
    n_init: int = 10,
    stability_seeds: tuple[int, ...] = (),
    progress: bool = False,
    frequency: str = "selection",
    **options: Any,
):
    """-> (new model with exactly num_experts experts per MoE layer, ReductionReport).

    calibration: a Calibration artifact made from this very model, or an iterable of token-id batches [B, T]
    (or (idx, mask) pairs) that is calibrated here. num_experts: int (every layer) or a per-layer list; for
    `mcsmoe` their sum is the global budget. frequency: the per-expert weights every method ranks and averages
    with (`layer_frequencies`: "selection" shares, the paper's frequencies, or "gate_mass"). A Hugging Face model
    (smoe_lab.hf) is reduced the same way into a new model of its own class. Bad input raises ValueError and changes
    nothing.
    """
    if options:
        raise ValueError(f"reduce_model: unknown option(s) {sorted(options)}")
    if method not in METHODS:
        raise ValueError(f"unknown reduction method {method!r}; known: {list(METHODS)}")
    if router not in ROUTER_OPTIONS:
        raise ValueError(f"unknown router option {router!r}; known: {list(ROUTER_OPTIONS)}")
    if frequency not in FREQUENCIES:
        raise ValueError(f"unknown frequency {frequency!r}; known: {list(FREQUENCIES)}")
    layers = model.moe_layers()
    if not layers:
        raise ValueError("reduce_model: the model has no MoE layers (dense model)")
    zs = [m.num_experts for m in layers]
    targets = _targets(num_experts, zs, method)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {"calibrate": 0.0}
    if isinstance(calibration, Calibration):
        check_compatible(calibration, model)
        cal = calibration
    else:
        t0 = time.perf_counter()
        cal = calibrate(model, calibration, progress=progress)
        seconds["calibrate"] = time.perf_counter() - t0
    if cal.experts_per_layer != zs:
        raise ValueError(f"calibration has experts per layer {cal.experts_per_layer}, the model {zs}")

    t0 = time.perf_counter()
    sims = [np.asarray(similarity_from_gram(s.gram)) for s in cal.layers]
    seconds["similarity"] = time.perf_counter() - t0
    freqs = [layer_frequencies(s, frequency) for s in cal.layers]
    plans = plan_layers(sims, freqs, method, targets, seed=seed, n_init=n_init)
    new_counts = [len(p.centres) for p in plans]
    expert_map = _compose_maps(model.config.expert_map, [p.labels for p in plans])
    if hasattr(model, "reduced_skeleton"):  # a Hugging Face model (smoe_lab.hf): its own classes and layout
        new = model.reduced_skeleton(new_counts, expert_map)
    else:
        new = GPT(model.config.replace(num_experts=new_counts, expert_map=expert_map))
        moe_prefixes = tuple(f"transformer.h.{b}.mlp." for b in model.config.moe_block_indices)
        shared = {k: v for k, v in model.state_dict().items() if not k.startswith(moe_prefixes)}
        missing, unexpected = new.load_state_dict(shared, strict=False)  # all but the MoE layers, filled below
        missing = [k for k in missing if not k.startswith(moe_prefixes) and k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(
                f"reduce_model: the reduced model does not fit the original: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    reports = []
    for i, (layer, new_layer, plan) in enumerate(zip(layers, new.moe_layers(), plans)):
        experts, t_align, t_merge = merge_groups(layer_experts(layer), freqs[i], plan, workers)
        std = getattr(model.config, "router_init_std", 0.02)
        r = _new_router(layer.router.weight.detach(), freqs[i], plan, router, seed * 1000 + i, std)
        _fill_layer(new_layer, experts, r)
        sil = cluster_silhouette(plan.embedding, plan.labels) if plan.embedding is not None else float("nan")
        gap = eigengap(plan.eigenvalues, len(plan.centres)) if plan.eigenvalues is not None else float("nan")
        stab = cluster_stability(sims[i], len(plan.centres), seeds=stability_seeds) if stability_seeds else float("nan")
        reports.append(
            LayerReport(
                layer=i,
                block=model.config.moe_block_indices[i],
                method=plan.method,
                experts_before=zs[i],
                experts_after=len(plan.centres),
                labels=plan.labels,
                frequencies=freqs[i],
                centres=plan.centres,
                similarity=sims[i],
                eigenvalues=plan.eigenvalues,
                embedding=plan.embedding,
                eigengap=gap,
                silhouette=sil,
                stability=stab,
                seconds={**{"eigen": 0.0, "kmeans": 0.0}, **plan.seconds, "align": t_align, "merge": t_merge},
                health=cal.layers[i].health,
            )
        )
    for key in ("eigen", "kmeans", "align", "merge"):
        seconds[key] = sum(r.seconds[key] for r in reports)
    seconds["total"] = time.perf_counter() - t_start
    new.to(next(model.parameters()).device).train(model.training)
    report = ReductionReport(
        method=method,
        router=router,
        seed=seed,
        num_experts=new_counts,
        layers=reports,
        seconds={k: round(v, 4) for k, v in seconds.items()},
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        calibration=cal.manifest,
        frequency=frequency,
        warning=specialisation_warning([r.health.entropy_ratio for r in reports]),
    )
    if report.warning:
        warnings.warn(f"reduce_model: the base model's {report.warning}", UserWarning, stacklevel=2)
    return new, report
