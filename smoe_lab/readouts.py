"""Low-noise readouts of what a reduction keeps, beside task accuracy (which, on a few hundred examples, moves by
points from seed to seed).

(i) Zero-shot domain LM loss: calibrate on one domain's held-out documents (`domain_calibration_batches`: in neither
    the training nor the validation split), reduce, and measure the LM loss on that domain's validation stream
    (`domain_lm_loss`) with no training after the reduction (routers merged or kept), against the unreduced model
    and the model with D experts trained from scratch. Thousands of tokens, a deterministic number per model.
(ii) Per-layer output reconstruction error (`layer_reconstruction`): on the calibration tokens, each MoE layer of the
    reduced model is fed exactly the input the base model's layer receives, and its output is compared with the base
    layer's output: error = sum ||y_reduced - y_base||^2 / sum ||y_base||^2 (0 = the layer is kept exactly; 1 = as
    far off as dropping the layer). Two variants:
      routed  the reduced layer as it is (its own router: merge / keep; meaningless for a re-initialised router),
      mapped  routed by the BASE router through the reduction's map (old expert z -> new expert labels[z], the base
              gate kept; a pruned expert's tokens get 0): what the experts' weights keep, whatever the router.
    Capacity is lifted (no drops) for both, so the number reflects weights and routing, not the capacity rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from .data.corpus import eval_window_starts
from .moe import top1_route


# -- (i) zero-shot domain LM loss --------------------------------------------------------------------------------
def domain_calibration_batches(
    corpus, domain: str, batch_size: int, block_size: int, max_tokens: int | None = None
) -> list[Tensor]:
    """A domain's held-out documents as calibration batches [B, T] (LongTensors, no padding): each document
    tokenised with the corpus tokenizer and followed by <|endoftext|>, concatenated, cut into non-overlapping windows
    of block_size; at most max_tokens tokens (whole windows; None = every document)."""
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    docs = corpus.heldout(domain)
    tok = corpus.tokenizer
    stream: list[int] = []
    for ids in tok.encode_batch(docs):
        stream += list(ids) + [tok.eot_id]
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    n_windows = len(stream) // block_size
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // block_size))
    if n_windows < 1:
        raise ValueError(f"held-out text of domain {domain!r} has {len(stream)} tokens: less than one block")
    windows = torch.tensor(stream[: n_windows * block_size], dtype=torch.long).view(n_windows, block_size)
    return list(windows.split(batch_size))


@torch.no_grad()
def domain_lm_loss(model, tokens: np.ndarray, batch_size: int = 16, max_windows: int = 0) -> dict[str, float]:
    """Token-weighted LM loss over the non-overlapping windows of a token stream (every window, or max_windows of
    them spread evenly), in eval mode (the model's eval capacity factor); also the MoE drop fraction."""
    block = model.config.block_size
    starts = eval_window_starts(len(tokens), 1, block, max_windows or None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = count = dropped = routed = 0.0
    try:
        for i in range(0, len(starts), batch_size):
            s = starts[i : i + batch_size]
            buf = torch.from_numpy(np.asarray(tokens[s[:, None] + np.arange(block + 1)], dtype=np.int64))
            x, y = buf[:, :-1].to(device), buf[:, 1:].to(device)  # (B, T)
            _, loss, _ = model(x, y)
            total += float(loss) * y.numel()
            count += y.numel()
            for t in model.telemetry():
                if t is not None:
                    dropped += t.dropped_fraction * t.num_tokens
                    routed += t.num_tokens
    finally:
        model.train(was_training)
    return {"loss": total / count, "drop_frac": dropped / routed if routed else 0.0, "tokens": int(count)}


# -- (ii) per-layer output reconstruction error -------------------------------------------------------------------
@contextmanager
def _no_drops(layers):
    saved = [m.drop_tokens for m in layers]
    try:
        for m in layers:
            m.drop_tokens = False
        yield
    finally:
        for m, d in zip(layers, saved):
            m.drop_tokens = d


def _expert_outputs(experts, x: Tensor, index: Tensor, gate: Tensor) -> Tensor:
    """gate * experts[index](x) per token; index -1 -> 0. x [N, C], index [N], gate [N] -> [N, C]."""
    out = torch.zeros_like(x)
    for e in torch.unique(index[index >= 0]).tolist():
        sel = index == e
        out[sel] = gate[sel].unsqueeze(1).to(x.dtype) * experts.forward_one(e, x[sel])
    return out


def reduction_labels(base, reduced) -> list[np.ndarray]:
    """Per MoE layer, the new expert index of each of the base's experts (-1 = pruned), from the reduced model's
    config.expert_map. The base must be an unreduced model (its own expert indices are the map's keys)."""
    if base.config.expert_map is not None:
        raise ValueError("layer_reconstruction: the base is itself a reduced model; pass labels= explicitly")
    if reduced.config.expert_map is None:
        raise ValueError("layer_reconstruction: the reduced model has no expert_map (was it made by reduce_model?)")
    return [np.asarray(m, dtype=np.int64) for m in reduced.config.expert_map]


@torch.no_grad()
def layer_reconstruction(
    base,
    reduced,
    batches: Iterable,
    labels: Sequence[np.ndarray] | None = None,
) -> list[dict[str, float]]:
    """Per MoE layer: {"routed", "mapped"} relative output errors of `reduced` against `base` on `batches`
    (LongTensors [B, T] or (idx, mask) pairs; padding excluded), see the module docstring."""
    base_layers, red_layers = base.moe_layers(), reduced.moe_layers()
    if len(base_layers) != len(red_layers):
        raise ValueError(f"base has {len(base_layers)} MoE layers, the reduced model {len(red_layers)}")
    labels = list(labels) if labels is not None else reduction_labels(base, reduced)
    maps = [torch.as_tensor(lab, dtype=torch.long) for lab in labels]
    for i, (m, lab) in enumerate(zip(base_layers, maps)):
        if lab.numel() != m.num_experts:
            raise ValueError(f"labels of MoE layer {i} have {lab.numel()} entries, the base layer {m.num_experts}")
    device = next(base.parameters()).device
    captured: list[Tensor | None] = [None] * len(base_layers)

    def hook(i):
        def fn(module, args):
            captured[i] = args[0].detach()

        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(base_layers)]
    sums = [[0.0, 0.0, 0.0] for _ in base_layers]  # routed err, mapped err, base norm
    was = (base.training, reduced.training)
    base.eval()
    reduced.eval()
    seen = 0
    try:
        with _no_drops(base_layers), _no_drops(red_layers):
            for item in batches:
                idx, mask = (item if isinstance(item, (tuple, list)) else (item, None))[:2]
                base(idx.to(device), mask=None if mask is None else mask.to(device))
                keep = None if mask is None else mask.reshape(-1).bool().to(device)
                for i, (bl, rl) in enumerate(zip(base_layers, red_layers)):
                    x = captured[i].reshape(-1, captured[i].shape[-1])  # [N, C]
                    if keep is not None:
                        x = x[keep]
                    r = top1_route(bl.router(x), 1.0, 0, drop_tokens=False)
                    y_base = _expert_outputs(bl.experts, x, r.expert_index, r.gate)  # [N, C]
                    new_index = maps[i].to(device)[r.expert_index]
                    y_mapped = _expert_outputs(rl.experts, x, new_index, r.gate)
                    y_routed = rl(x.unsqueeze(0)).squeeze(0)
                    sums[i][0] += float((y_routed - y_base).pow(2).sum())
                    sums[i][1] += float((y_mapped - y_base).pow(2).sum())
                    sums[i][2] += float(y_base.pow(2).sum())
                seen += 1
    finally:
        for h in handles:
            h.remove()
        base.train(was[0])
        reduced.train(was[1])
    if seen == 0:
        raise ValueError("layer_reconstruction: no calibration batches")
    return [{"routed": s[0] / max(s[2], 1e-30), "mapped": s[1] / max(s[2], 1e-30)} for s in sums]
