"""Encoding examples for finetuning, evaluation and calibration, and the finetuning batch stream.

No packing, as the paper's A4: one example per row, right padding, targets -1 on the prompt and the padding, the
prompt truncated from the left when too long, never the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from smoe_lab.data.tasks.example import Example


def pair_ids(prompt: Sequence[int], answer: Sequence[int], block_size: int, bos_id: int) -> tuple[list[int], int]:
    """(prompt + answer, number of prompt tokens) with the prompt cut from the left so the model input
    (everything but the last token) fits block_size. An empty prompt becomes [bos_id] (<|endoftext|>)."""
    if not answer:
        raise ValueError("a choice encodes to no tokens")
    if len(answer) > block_size:
        raise ValueError(f"a choice of {len(answer)} tokens does not fit block_size {block_size}")
    prompt = list(prompt) or [bos_id]
    prompt = prompt[-(block_size + 1 - len(answer)) :]
    return prompt + list(answer), len(prompt)


def shift_targets(seq: Sequence[int], n_prompt: int) -> tuple[list[int], list[int]]:
    """(ids, targets): ids = seq[:-1]; targets[t] = seq[t + 1] on answer tokens, -1 on the prompt."""
    ids = list(seq[:-1])
    targets = [-1] * (n_prompt - 1) + list(seq[n_prompt:])
    return ids, targets


def encode_for_training(tok, examples: Sequence[Example], block_size: int) -> list[tuple[list[int], list[int]]]:
    """(ids, targets) per example, no packing: loss on the correct choice's tokens only (targets -1 elsewhere);
    the prompt is truncated from the left when too long, never the answer. len(ids) <= block_size."""
    if not examples:
        raise ValueError("no examples to encode")
    prompts = tok.encode_batch([e.input for e in examples])
    answers = tok.encode_batch([e.target for e in examples])
    out = []
    for e, p, a in zip(examples, prompts, answers):
        try:
            seq, n_p = pair_ids(p, a, block_size, tok.eot_id)
        except ValueError as err:
            raise ValueError(f"{e.task} example {e.idx}: {err}") from None
        out.append(shift_targets(seq, n_p))
    return out


def collate(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (ids, targets) pairs to the longest: idx [B, T] long, targets [B, T] long (-1 on padding),
    mask [B, T] bool (True on real tokens)."""
    t = max(len(ids) for ids, _ in pairs)
    idx = torch.full((len(pairs), t), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), t), -1, dtype=torch.long)
    mask = torch.zeros((len(pairs), t), dtype=torch.bool)
    for b, (ids, tg) in enumerate(pairs):
        idx[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        targets[b, : len(tg)] = torch.tensor(tg, dtype=torch.long)
        mask[b, : len(ids)] = True
    return idx, targets, mask


class TaskBatches:
    """next_batch() over encoded examples: right-padded micro-batches, endless, reshuffled every epoch.

    Micro-batch k holds items [kB, (k+1)B) of the stream perm_0 ++ perm_1 ++ ..., where perm_e is a random
    permutation seeded by (base, e) and `base` is drawn once from `generator` when the object is made. The only
    state is the counter k, so `skip(k)` puts a fresh object (made from an identically seeded generator) exactly
    where an interrupted run stood: resume stays bit-exact although the permutation is not in the checkpoint.
    """

    def __init__(
        self,
        encoded: Sequence[tuple[list[int], list[int]]],
        batch_size: int,
        generator: torch.Generator,
        pad_id: int = 0,
    ):
        if not encoded:
            raise ValueError("no encoded examples to draw batches from")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.encoded = list(encoded)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.base = int(torch.randint(2**62, (1,), generator=generator))
        self.count = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.base + epoch)
            self._perm = (epoch, torch.randperm(len(self.encoded), generator=g))
        return self._perm[1]

    def indices(self, k: int) -> list[int]:
        """Example indices of micro-batch k."""
        n = len(self.encoded)
        return [
            int(self._epoch_perm(pos // n)[pos % n]) for pos in range(k * self.batch_size, (k + 1) * self.batch_size)
        ]

    def skip(self, k: int) -> None:
        """Advance past k micro-batches without building them."""
        self.count += k

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = collate([self.encoded[i] for i in self.indices(self.count)], self.pad_id)
        self.count += 1
        return batch


def training_batches(
    encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, generator: torch.Generator, pad_id: int = 0
) -> TaskBatches:
    """A callable next_batch() -> (idx [B, T], targets [B, T], mask [B, T]) over `encoded` (see TaskBatches)."""
    return TaskBatches(encoded, batch_size, generator, pad_id)


def calibration_batches(
    tok,
    examples: Sequence[Example],
    batch_size: int,
    block_size: int,
    max_tokens: int | None = None,
    with_answer: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(idx [B, T] long, mask [B, T] bool) batches of the task text, in example order, for router calibration.

    Each sequence is an example's input followed (with_answer) by its correct choice, i.e. exactly the tokens the
    model is finetuned on, cut from the left to block_size. max_tokens: stop after the example that reaches this
    many real tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not examples:
        raise ValueError("no examples to build calibration batches from")
    prompts = tok.encode_batch([e.input for e in examples])
    answers = tok.encode_batch([e.target for e in examples]) if with_answer else [[] for _ in examples]
    seqs, total = [], 0
    for p, a in zip(prompts, answers):
        seq = (list(p) + list(a))[-block_size:] or [tok.eot_id]
        seqs.append(seq)
        total += len(seq)
        if max_tokens is not None and total >= max_tokens:
            break
    out = []
    for i in range(0, len(seqs), batch_size):
        idx, _, mask = collate([(s, s) for s in seqs[i : i + batch_size]], pad_id=tok.eot_id)
        out.append((idx, mask))
    return out
