"""A test hook for crash recovery: kill the process with SIGKILL at a named point.

`SMOE_LAB_KILL_AT="step:3"` kills the process the 3rd time it reaches `hit("step")` (the start of an optimizer
step); several points are separated by commas. Points: "step" (train.fit, between steps), "save-written" (a
checkpoint's files are in its temporary folder, nothing replaced yet) and "save-swapped" (the old checkpoint moved
aside, the new one not yet in its place). Without the variable `hit` only returns; the kill-and-resume tests use
it to show that every such point resumes to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal

ENV = "SMOE_LAB_KILL_AT"
_counts: dict[str, int] = {}


def hit(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    _counts[point] = _counts.get(point, 0) + 1
    for item in spec.split(","):
        name, _, n = item.strip().partition(":")
        if name == point and n.isdigit() and int(n) == _counts[point]:
            os.kill(os.getpid(), signal.SIGKILL)
