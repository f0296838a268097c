"""Task accuracy by rank classification, and the baselines it is read against.

Each choice is scored by the sum of its tokens' log-likelihoods given the input (the same prompt + answer
encoding as finetuning, `smoe_lab.data.tasks.pair_ids`); the prediction is the highest-scoring choice (the first
one on ties). That is `accuracy` (lm-eval-harness's acc). `acc_norm` ranks by the mean log-likelihood per answer
token instead (length-normalised), which removes the summed score's preference for choices of fewer tokens; the
two agree when an example's choices have equal token counts (BoolQ's " Yes"/" No"). The tables use `accuracy`:
after finetuning on the answer tokens, the summed log-likelihood is the model's own probability of the whole answer.

(example, choice) pairs are batched with right padding and a mask, so padding never enters MoE routing; scoring
runs in eval mode (eval capacity factor, 1.0 in the paper) under torch.no_grad.

With drop_tokens and capacity factor 1.0 an expert can overflow in a batch, so in an SMoE a score can depend on
which other sequences share its batch, exactly as in the paper's batched evaluation. Pairs are batched in a
fixed order (longest first), so results are deterministic for a given batch_size.

LM loss / perplexity on corpus windows is `smoe_lab.train.lm_eval_loss`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint
from .config import TrainConfig
from .data.tasks import Example, collate, load_task, pair_ids, shift_targets
from .loop import autocast_for
from .protocol import DEV_SPLIT, EvalSpec, dev_split


def _pairs(tok, examples: Sequence[Example], block_size: int) -> list[tuple[int, int, list[int], list[int]]]:
    """(example index, choice index, ids, targets) for every choice of every example."""
    prompts = tok.encode_batch([e.input for e in examples])
    flat = [c for e in examples for c in e.choices]
    answers = iter(tok.encode_batch(flat))
    out = []
    for i, (e, p) in enumerate(zip(examples, prompts)):
        for j in range(len(e.choices)):
            try:
                seq, n_p = pair_ids(p, next(answers), block_size, tok.eot_id)
            except ValueError as err:
                raise ValueError(f"{e.task} example {e.idx} choice {j}: {err}") from None
            out.append((i, j, *shift_targets(seq, n_p)))
    return out


@torch.no_grad()
def choice_logprobs(
    model,
    tok,
    examples: Sequence[Example],
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = False,
    block_size: int | None = None,
    dtype: str = "float32",
) -> tuple[list[list[float]], list[list[int]]]:
    """(scores, lengths): per example and choice, the summed log-likelihood of the choice tokens and their count."""
    if not examples:
        raise ValueError("no examples to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    block = block_size or model.config.block_size
    if block > model.config.block_size:
        raise ValueError(f"block_size {block} exceeds the model's block_size {model.config.block_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pairs = sorted(_pairs(tok, examples, block), key=lambda p: -len(p[2]))  # longest first: less padding
    scores = [[0.0] * len(e.choices) for e in examples]
    lengths = [[0] * len(e.choices) for e in examples]
    was_training = model.training
    model.eval()
    amp = TrainConfig(dtype=dtype)
    try:
        for s in tqdm(range(0, len(pairs), batch_size), desc="score", disable=not progress):
            chunk = pairs[s : s + batch_size]
            idx, targets, mask = (t.to(device) for t in collate([(p[2], p[3]) for p in chunk], tok.eot_id))
            with autocast_for(device, amp):
                if getattr(model, "scores_from_targets", False):  # encoder-decoder (smoe_lab.hf): answers from targets
                    logits = model(idx, targets, mask=mask)[0]  # (B, T, V), the decoder's at the answer positions
                else:
                    logits = model(idx, mask=mask)  # (B, T, V)
            logp = F.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
            sums = (picked * targets.ne(-1)).sum(1).tolist()
            for (i, j, _, tg), v in zip(chunk, sums):
                scores[i][j] = v
                lengths[i][j] = sum(t != -1 for t in tg)
    finally:
        model.train(was_training)
    return scores, lengths


def score_choices(
    model,
    tok,
    examples: Sequence[Example],
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = False,
    block_size: int | None = None,
) -> list[list[float]]:
    """Per example, per choice: sum of log p(choice token | input, earlier choice tokens) (rank classification).

    The input is truncated from the left to fit block_size (default: the model's)."""
    return choice_logprobs(model, tok, examples, batch_size, device, progress, block_size)[0]


def predictions(scores: Sequence[Sequence[float]]) -> list[int]:
    """Index of the best choice per example (the first on ties)."""
    return [max(range(len(s)), key=lambda j: (s[j], -j)) for s in scores]


def top_prediction_share(preds: Sequence[int]) -> float:
    """Share of examples that get the most frequent predicted choice index: 1.0 = the model answers the same
    choice (e.g. "yes") for every example, a model that learned nothing but the floor."""
    if not preds:
        raise ValueError("top_prediction_share needs predictions")
    return max(Counter(preds).values()) / len(preds)


def wilson_interval(acc: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (default 95%) of an accuracy measured on n examples -> (low, high) in [0, 1]."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0 examples, got {n}")
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {acc}")
    denom = 1 + z * z / n
    centre = (acc + z * z / (2 * n)) / denom
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(examples: Sequence[Example], preds: Sequence[int]) -> float:
    """Share of examples whose prediction is a correct choice (ReCoRD: any correct entity)."""
    if len(examples) != len(preds) or not examples:
        raise ValueError(f"need as many predictions as examples (> 0), got {len(preds)} for {len(examples)}")
    return sum(p in e.correct for e, p in zip(examples, preds)) / len(examples)


def evaluate_task(
    model,
    tok,
    examples: Sequence[Example],
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = False,
    block_size: int | None = None,
    dtype: str = "float32",
) -> dict[str, float]:
    """{"accuracy", "acc_norm", "loss", "n", "top_pred_share", "seconds"} on `examples`.

    accuracy ranks choices by summed log-likelihood, acc_norm by mean log-likelihood per answer token. loss is the
    mean per-token negative log-likelihood of the correct choice (`label`), token-weighted over all examples;
    accuracy counts any correct choice (`Example.correct`). top_pred_share: the share of the most frequent
    predicted choice index under `accuracy`'s ranking (1.0 = one answer for everything). dtype as
    TrainConfig.dtype (float32 default; "auto" uses bf16 autocast on CUDA).
    """
    t0 = time.perf_counter()
    scores, lengths = choice_logprobs(model, tok, examples, batch_size, device, progress, block_size, dtype)
    nll = -sum(s[e.label] for s, e in zip(scores, examples))
    tokens = sum(n[e.label] for n, e in zip(lengths, examples))
    per_token = [[v / max(n, 1) for v, n in zip(s, ns)] for s, ns in zip(scores, lengths)]
    preds = predictions(scores)
    return {
        "accuracy": accuracy(examples, preds),
        "acc_norm": accuracy(examples, predictions(per_token)),
        "loss": nll / tokens,
        "n": float(len(examples)),
        "top_pred_share": top_prediction_share(preds),
        "seconds": time.perf_counter() - t0,
    }


def majority_baseline(train_examples: Sequence[Example], eval_examples: Sequence[Example]) -> float:
    """Accuracy on eval_examples of always answering the most frequent train label index (smallest index on
    ties). For tasks whose choices vary per example (ReCoRD, cloze) this is just "always the k-th choice"."""
    if not train_examples:
        raise ValueError("majority baseline needs training examples")
    counts = Counter(e.label for e in train_examples)
    top = min(counts, key=lambda k: (-counts[k], k))
    return accuracy(eval_examples, [top] * len(eval_examples))


def chance_baseline(examples: Sequence[Example]) -> float:
    """Expected accuracy of a uniformly random choice: mean of |correct choices| / |choices|."""
    if not examples:
        raise ValueError("chance baseline needs examples")
    return sum(len(e.correct) / len(e.choices) for e in examples) / len(examples)


def evaluate_checkpoint(
    path,
    task: str,
    split: str = "validation",
    corpus=None,
    root=None,
    source: str | None = None,
    max_examples: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    seed: int | None = None,
    progress: bool = False,
    block_size: int | None = None,
    dtype: str | None = None,
) -> dict[str, float]:
    """Load a checkpoint (with its tokenizer) and evaluate it on a task split; adds the chance baseline and the
    majority baseline of the task's train split ("majority" is NaN when no train split is available).

    A checkpoint chosen by finetuning carries an EvalSpec (`smoe_lab.protocol`): every argument left at None is
    taken from it (examples, seed, corpus, batch size, block size, dtype), so the result equals the stored one
    exactly. split "dev" (only with an EvalSpec) rebuilds the dev split the checkpoint was selected on.
    Without a spec: batch 16, the model's block size, float32, seed 0, source "auto", every example.
    """
    _, meta = checkpoint.read_config(path)
    spec = EvalSpec.from_meta(meta)
    same_task = spec is not None and spec.task.lower() == task.lower()
    if split == DEV_SPLIT and not same_task:
        why = "has no eval_spec" if spec is None else f"was finetuned on {spec.task!r}, not {task!r}"
        raise ValueError(f"split 'dev' rebuilds a finetuning's dev split, but checkpoint {path} {why}")

    def pick(given, from_spec, default):
        return given if given is not None else (from_spec if spec is not None else default)

    batch_size = pick(batch_size, spec and spec.batch_size, 16)
    block_size = pick(block_size, spec and spec.block_size, None)
    dtype = pick(dtype, spec and spec.dtype, "float32")
    if same_task:
        seed, corpus = pick(seed, spec.seed, 0), corpus or spec.corpus
        root, source = root or spec.root, source or spec.source
    seed, source = 0 if seed is None else seed, source or "auto"
    corpus = corpus or meta.get("corpus")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kw = dict(root=root, source=source, seed=seed, corpus=corpus)
    if split == DEV_SPLIT:
        train = load_task(task, "train", max_examples=spec.max_train_examples, **kw)
        examples = dev_split(train, spec.dev_fraction, spec.dev_max_examples, seed)[1]
    else:
        n = max_examples if max_examples is not None else (spec.max_eval_examples if same_task else None)
        examples = load_task(task, split, max_examples=n, **kw)
    model = checkpoint.load(path, device=dev)
    tok = checkpoint.load_tokenizer(path)
    result = evaluate_task(model, tok, examples, batch_size, progress=progress, block_size=block_size, dtype=dtype)
    try:
        n_train = spec.max_train_examples if same_task else (max_examples if task.startswith("cloze-") else None)
        result["majority"] = majority_baseline(load_task(task, "train", max_examples=n_train, **kw), examples)
    except FileNotFoundError:
        result["majority"] = float("nan")
    result["chance"] = chance_baseline(examples)
    return result
