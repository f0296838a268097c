"""Progress lines on the terminal of a batch run.

`smoe-lab run` executes notebooks under papermill: what a kernel prints goes into the executed notebook, not to the
terminal, so a long notebook looks silent. `report(msg)` writes one line, with the wall-clock time, the seconds
since the pipeline started and the notebook's name, straight to the terminal the pipeline runs in: inside an
ipykernel that is the kernel's copy of its original stderr (`sys.stderr.fileno()`; the line does not go into the
notebook), in a plain process its stderr. It does nothing unless the pipeline asked for it (`SMOE_LAB_PROGRESS=1`,
set by `run_pipeline` for its notebooks), so notebooks in JupyterLab, tests and library calls stay quiet.

`Ticker` throttles a loop's lines (at most one per `every` seconds, plus the last step).
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "SMOE_LAB_PROGRESS"  # "1": write progress lines
ENV_T0 = "SMOE_LAB_PROGRESS_T0"  # the pipeline's start (time.time())
ENV_NOTEBOOK = "SMOE_LAB_NOTEBOOK"  # the notebook being executed


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def _terminal_fd() -> int:
    try:
        return sys.stderr.fileno()  # ipykernel: the copy of the original stderr, not the notebook's stream
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 2


def line(msg: str) -> str:
    """The line `report` writes: "[HH:MM:SS +SSSs] notebook: msg"."""
    try:
        elapsed = f" +{time.time() - float(os.environ[ENV_T0]):.0f}s"
    except (KeyError, ValueError):
        elapsed = ""
    nb = os.environ.get(ENV_NOTEBOOK)
    return f"[{time.strftime('%H:%M:%S')}{elapsed}] {nb + ': ' if nb else ''}{msg}"


def report(msg: str) -> None:
    """One progress line on the batch run's terminal (nothing unless SMOE_LAB_PROGRESS=1)."""
    if not enabled():
        return
    try:
        os.write(_terminal_fd(), (line(msg) + "\n").encode("utf-8", "replace"))
    except OSError:
        pass  # a closed terminal must not stop the run


@contextmanager
def stage(what: str) -> Iterator[None]:
    """Report `what` when it starts and, with its seconds, when it ends."""
    report(f"{what} ...")
    t0 = time.perf_counter()
    yield
    report(f"{what}: done in {time.perf_counter() - t0:.1f}s")


class Ticker:
    """Throttled loop progress: `tick(i, extra)` reports "what: i/total (extra), Ns" at most every `every` s."""

    def __init__(self, what: str, total: int, every: float = 20.0):
        self.what, self.total, self.every = what, total, every
        self.t0 = self.last = time.perf_counter()

    def tick(self, i: int, extra: str = "") -> None:
        now = time.perf_counter()
        if not enabled() or (now - self.last < self.every and i < self.total):
            return
        self.last = now
        report(f"{self.what}: {i}/{self.total}{f' ({extra})' if extra else ''}, {now - self.t0:.0f}s")
