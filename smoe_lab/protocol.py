"""The measurement protocol: select on one split, report on another, and say how to reproduce the number.

- `dev_split` carves a seeded dev split out of a task's train examples. Examples that share a passage or a
  document (BoolQ questions on one passage, ReCoRD queries on one article, cloze items of one document) go to the
  same side, so the dev split never sees a text the model was finetuned on.
- Finetuning trains on the rest, evaluates on the dev split to choose a checkpoint, then measures the chosen
  checkpoint ONCE on the task's validation split: that is the reported number (metrics "accuracy", "acc_norm",
  "loss"); the selection numbers are stored as "dev_accuracy", "dev_acc_norm", "dev_loss" (`metric_names`).
- The chosen checkpoint carries an `EvalSpec` in its meta (task, examples, block size, dtype, batch size), so
  `smoe-lab evaluate` on it recomputes exactly the stored numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

REPORT_SPLIT = "validation"
DEV_SPLIT = "dev"
METRICS = ("accuracy", "acc_norm", "loss")  # what evaluate_task reports, in store order
PREFIX = {REPORT_SPLIT: "", DEV_SPLIT: "dev_", "train": "train_"}


def metric_names(split: str) -> dict[str, str]:
    """evaluate_task's keys -> the results store's metric names for a split ("accuracy" on validation,
    "dev_accuracy" on the dev split, "train_accuracy" on train)."""
    if split not in PREFIX:
        raise ValueError(f"unknown split {split!r}; use one of {list(PREFIX)}")
    return {m: PREFIX[split] + m for m in METRICS}


def group_of(example) -> str:
    """The text an example shares with others of its task: passage (BoolQ, ReCoRD), document (cloze), else itself."""
    task = example.task.lower()
    if task.startswith("cloze-"):
        return str(example.idx).split(":", 1)[0]
    if task == "boolq":
        return example.input.rsplit(" Question: ", 1)[0]
    if task == "record":
        return example.input.split("\n\nQuery: ", 1)[0]
    return f"{example.task}/{example.idx}"


def dev_split(examples: Sequence[Any], fraction: float, max_examples: int = 0, seed: int = 0) -> tuple[list, list]:
    """(train, dev): about `fraction` of the examples (at most max_examples when > 0, at least 1) held out as dev.

    Whole groups (`group_of`) move, chosen in a seeded random order until the dev split has its size; both parts
    keep the original order. Deterministic in (examples, fraction, max_examples, seed).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {fraction!r}")
    if len(examples) < 2:
        raise ValueError(f"carving a dev split needs at least 2 training examples, got {len(examples)}")
    want = max(1, math.ceil(fraction * len(examples)))
    if max_examples:
        want = min(want, max_examples)
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(group_of(e), []).append(i)
    if len(groups) < 2:
        raise ValueError(f"the {len(examples)} training examples share one passage: no disjoint dev split exists")
    names = list(groups)
    dev: set[int] = set()
    for g in np.random.default_rng([seed, 0xDE7]).permutation(len(names)):
        if len(dev) >= want:
            break
        if len(dev) + len(groups[names[g]]) >= len(examples):
            continue  # never move every example
        dev.update(groups[names[g]])
    if not dev:
        raise ValueError(f"no group of the {len(examples)} training examples fits a dev split of {want}")
    train = [e for i, e in enumerate(examples) if i not in dev]
    return train, [e for i, e in enumerate(examples) if i in dev]


@dataclass
class EvalSpec:
    """Everything `smoe-lab evaluate` needs to recompute a finetuning's numbers on the checkpoint it chose.

    Examples: `load_task(task, "train"/"validation", max_examples=..., seed=seed, corpus=corpus)`; the dev split
    is `dev_split(train examples, dev_fraction, dev_max_examples, seed)`. Scoring: `evaluate_task` with
    batch_size, block_size and dtype (batches are composed in a fixed order, so the numbers are exact).
    """

    task: str
    seed: int
    max_train_examples: int | None
    max_eval_examples: int | None
    dev_fraction: float
    dev_max_examples: int
    batch_size: int
    block_size: int
    dtype: str
    corpus: str | None = None
    root: str | None = None
    source: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> EvalSpec | None:
        doc = meta.get("eval_spec")
        return cls(**doc) if isinstance(doc, dict) else None


def metric_rows(common: dict[str, Any], result: dict[str, float], split: str) -> list[dict[str, Any]]:
    """Results-store rows (one per metric) of an evaluate_task result on a split, under the split's names."""
    return [{**common, "metric": name, "value": float(result[key])} for key, name in metric_names(split).items()]
