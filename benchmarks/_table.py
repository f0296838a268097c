"""Helpers shared by the benchmarks: interleaved timing rounds, median and spread, Markdown tables."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence


def spread(values: Sequence[float]) -> str:
    """'median (min-max)' of a list of numbers."""
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table, numbers right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, width)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in width) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each fn per round; every round runs each fn once, in order (noise hits all alike)."""
    import time

    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t0)
    return out
