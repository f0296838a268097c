"""How smoe_lab's causal (ids, targets) rows become encoder-decoder batches for Switch Transformers.

smoe_lab encodes a task example as one causal row: ids = prompt + answer[:-1], targets = -1 on the prompt and the
answer tokens after it (smoe_lab.data.tasks.pair_ids / shift_targets). For an encoder-decoder model the same row
means, with s the first position whose target is not -1:

    encoder   prompt = ids[: s + 1], then EOS (T5's inputs end with </s>)
    decoder   decoder_start_token, answer[:-1]  ->  predicts answer = targets[s:] (the choice tokens, no EOS)

so log p(answer | input) comes from the decoder, finetuning puts the loss on the answer, and the decoder logits are
written back at the causal positions s, s+1, ... of the row (`rows`, `src`, `dst`), so that code written for causal
logits (rank classification) reads them unchanged.

Without targets (calibration batches, token ids [B, T]) both stacks read the same tokens: the encoder ids + EOS, the
decoder the ids shifted right behind decoder_start_token (teacher forcing on the text itself), so the routers of
the encoder and of the decoder are measured on every calibration token. Router statistics skip the added EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Seq2SeqBatch:
    input_ids: Tensor  # [B, S] long, right-padded
    attention_mask: Tensor  # [B, S] long
    encoder_stats: Tensor  # [B, S] bool: real input tokens (the added EOS and padding excluded)
    decoder_input_ids: Tensor  # [B, U] long
    decoder_attention_mask: Tensor  # [B, U] long
    labels: Tensor  # [B, U] long, -1 where nothing is predicted
    rows: Tensor  # [M] row of each predicted token
    src: Tensor  # [M] its decoder position
    dst: Tensor  # [M] its position in the causal row


def _pad(rows: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    return out, mask


def _lengths(idx: Tensor, mask: Tensor | None) -> list[int]:
    return [idx.shape[1]] * idx.shape[0] if mask is None else mask.long().sum(1).tolist()


def _encoder(prompts: list[list[int]], eos_id: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    ids, att = _pad([p + [eos_id] for p in prompts], pad_id)
    stats = att.bool().clone()
    for b, p in enumerate(prompts):
        stats[b, len(p)] = False  # the EOS the adapter added
    return ids, att, stats


def from_causal(idx: Tensor, targets: Tensor, mask: Tensor | None, eos_id: int, start_id: int, pad_id: int):
    """Seq2SeqBatch of causal rows (ids [B, T], targets [B, T] with -1 off the answer, mask [B, T])."""
    idx, targets = idx.cpu(), targets.cpu()
    prompts, dec_in, labels, rows, src, dst = [], [], [], [], [], []
    for b, n in enumerate(_lengths(idx, None if mask is None else mask.cpu())):
        ids, tg = idx[b, :n].tolist(), targets[b, :n].tolist()
        pos = [t for t, y in enumerate(tg) if y != -1]
        s = pos[0] if pos else n - 1
        prompts.append(ids[: s + 1])
        answer = [tg[t] for t in pos]
        dec_in.append([start_id] + answer[:-1])
        labels.append(answer or [-1])
        rows += [b] * len(pos)
        src += list(range(len(pos)))
        dst += pos
    enc, att, stats = _encoder(prompts, eos_id, pad_id)
    dec, dec_att = _pad(dec_in, pad_id)
    lab, _ = _pad(labels, -1)
    as_long = (torch.tensor(x, dtype=torch.long) for x in (rows, src, dst))
    return Seq2SeqBatch(enc, att, stats, dec, dec_att, lab, *as_long)


def from_tokens(idx: Tensor, mask: Tensor | None, eos_id: int, start_id: int, pad_id: int) -> Seq2SeqBatch:
    """Seq2SeqBatch of plain token rows [B, T]: the encoder reads them, the decoder is teacher-forced on them."""
    idx = idx.cpu()
    lengths = _lengths(idx, None if mask is None else mask.cpu())
    toks = [idx[b, :n].tolist() for b, n in enumerate(lengths)]
    enc, att, stats = _encoder(toks, eos_id, pad_id)
    dec, dec_att = _pad([[start_id] + t[:-1] for t in toks], pad_id)
    lab, _ = _pad(toks, -1)
    rows = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(lengths)])
    pos = torch.cat([torch.arange(n) for n in lengths])
    return Seq2SeqBatch(enc, att, stats, dec, dec_att, lab, rows, pos, pos)
