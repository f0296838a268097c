"""The first science run's verdicts (a constant table citing it), and the per-claim paragraph "what changed against
the first study and why" of the report: the current verdict and numbers are computed from the results store; only
the first run's are constants.

First run: docs/replication.md at commit 681dfeb (params/05_replication/science.yaml of that commit): the paper's
router settings, under which the routers stayed near uniform (entropy ~0.98 ln E at 32e: each MoE layer ~1/E of an
FFN), variants dense / 4e / 8e / 32e, tasks BoolQ + cloze-news + cloze-biomed (the floor rule dropped BoolQ from the
verdicts), 3 seeds, 1.2M tokens per model, the 32e base reduced to 16/8/4/2 with every method.
"""

from __future__ import annotations

from dataclasses import dataclass

from .stats import INCONCLUSIVE, NOT_SUPPORTED

PREVIOUS_COMMIT = "681dfeb"
PREVIOUS_VARIANTS = [1, 4, 8, 32]
PREVIOUS_TASKS = ["boolq", "cloze-news", "cloze-biomed"]
PREVIOUS_FLOOR_DROPPED = ["boolq"]  # the tasks the floor rule left out of the first verdicts
PREVIOUS_TOKENS = 1_200_000
PREVIOUS_SEEDS = 3
PREVIOUS_ENTROPY_RATIO = 0.98  # router entropy / ln E of the 32e models at the end of pretraining (docs/routers.md)
PREVIOUS_SETUP = (
    "the paper's router settings (routers near uniform: entropy ~0.98 ln E at 32e, so each MoE layer contributed "
    "~1/E of an FFN), variants dense / 4e / 8e / 32e, BoolQ + cloze-news + cloze-biomed (BoolQ dropped by the floor "
    "rule), 3 seeds, 1.2M tokens per model"
)


@dataclass(frozen=True)
class PreviousVerdict:
    verdict: str
    numbers: str  # the first run's pooled differences, as its report gave them


PREVIOUS = {
    "a": PreviousVerdict(
        NOT_SUPPORTED,
        "paper protocol: 4e vs dense -0.21 ± 0.07, 8e vs 4e +0.06 ± 0.04, 32e vs 8e +0.02 ± 0.11 nats "
        "(every MoE above dense: 4e +0.206, 8e +0.150, 32e +0.128 nats)",
    ),
    "b": PreviousVerdict(INCONCLUSIVE, "scratch D vs greedy pruning 32e->D (D = 8, 4): -0.49 ± 0.85 accuracy points"),
    "c": PreviousVerdict(
        INCONCLUSIVE,
        "uncurl vs freq_prune -0.11 ± 0.23, vs freq_merge +0.00 ± 0.22, vs mcsmoe -0.08 ± 0.28 accuracy points",
    ),
    "d": PreviousVerdict(
        NOT_SUPPORTED,
        "4x (32e->8e) uncurl vs scratch -0.20 ± 0.78, 8x (32e->4e) scratch vs uncurl -0.98 ± 0.52 accuracy points; "
        "2x and 16x untested (no 16e or 2e scratch model)",
    ),
    "e": PreviousVerdict(INCONCLUSIVE, "hybrid vs uncurl -0.03 ± 0.07 accuracy points"),
}

# Why a claim may read differently now, per claim: what the first run's regime hid (fixed text; the numbers that go
# with it are computed in `changed_paragraph`).
WHY = {
    "a": "With near-uniform routers every token got ~1/E of one expert's output, so the SMoE was a dense model with "
    "its MoE blocks nearly switched off; with routers that choose, each MoE layer contributes a whole expert, which "
    "is the regime the paper's claim is about.",
    "b": "Greedy pruning of near-interchangeable experts loses little, so it could hardly fall below scratch; with "
    "specialised experts a pruned expert's tokens lose the function it carried.",
    "c": "With near-uniform routers all reductions looked alike (32e -> 4e cost ~+0.02 nats without finetuning); "
    "with specialised experts what a method keeps should separate the methods, which the zero-shot readout measures "
    "without the finetuning noise.",
    "d": "The threshold is about how much of a trained SMoE a reduction keeps; it only exists when the experts carry "
    "distinct functions, and the first run could test only two factors.",
    "e": "The hybrid differs from UNCURL only in the first MoE layer; its effect depends on whether that layer's "
    "experts form clusters, which near-uniform routers could not show.",
}


def _tag(current: str, previous: str) -> str:
    return "unchanged" if current == previous else f"changed from **{previous}** to **{current}**"


def changed_paragraph(key: str, current: str, numbers: str, differences: list[str]) -> str:
    """The report's paragraph for one claim: the first run's verdict and numbers (constants), this run's (computed),
    what differs between the runs (`differences`, computed from the store and the settings) and why it may matter."""
    prev = PREVIOUS[key]
    s = (
        f"**What changed against the first study.** First study (docs/replication.md at {PREVIOUS_COMMIT}: "
        f"{PREVIOUS_SETUP}): **{prev.verdict}** ({prev.numbers}). This run: **{current}** ({numbers or 'no data'}); "
        f"the verdict is {_tag(current, prev.verdict)}. "
    )
    if differences:
        s += "What differs: " + "; ".join(differences) + ". "
    s += (
        f"Why it may matter: {WHY[key]} The runs differ in several settings at once, so a change of verdict is not "
        "attributed to one of them by this comparison alone.\n"
    )
    return s
