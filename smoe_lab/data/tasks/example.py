"""The unit every task is made of: `Example`, a rank-classification item, plus the text helpers its builders share.

The model scores each choice as a continuation of `input` (sum of the choice tokens' log-likelihoods, see
`smoe_lab.evaluate`), and finetuning puts the loss on the correct choice's tokens only. Choices start with a space,
so they tokenize the same way whether they stand alone or follow the input (GPT-2's pre-tokenizer splits at the
space).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "validation")


@dataclass
class Example:
    """One rank-classification item: `choices[label]` is the correct continuation of `input`.

    answers: every correct choice index when there are several (ReCoRD: an entity can occur under several
    surface forms); empty means just `label`. Accuracy counts a prediction in `correct` as right.
    """

    task: str
    idx: int | str
    input: str
    choices: list[str]
    label: int
    answers: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.choices) < 1 or not 0 <= self.label < len(self.choices):
            raise ValueError(f"{self.task} example {self.idx}: label {self.label} outside {len(self.choices)} choices")
        if self.answers and self.label not in self.answers:
            raise ValueError(f"{self.task} example {self.idx}: label {self.label} is not among answers {self.answers}")

    @property
    def correct(self) -> frozenset[int]:
        """Indices of every correct choice."""
        return frozenset(self.answers) if self.answers else frozenset((self.label,))

    @property
    def target(self) -> str:
        return self.choices[self.label]


def as_choice(text: str) -> str:
    """A choice as a continuation: one leading space, inner whitespace collapsed."""
    return " " + " ".join(str(text).split())


def clean(text: str) -> str:
    """Inner whitespace collapsed to single spaces, ends stripped."""
    return " ".join(str(text).split())


def subsample(examples: list[Example], max_examples: int | None, seed: int = 0) -> list[Example]:
    """A seeded random subset of at most max_examples, in the original order (all of them when None or 0)."""
    if not max_examples or max_examples >= len(examples):
        return list(examples)
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=max_examples, replace=False))
    return [examples[i] for i in keep]
