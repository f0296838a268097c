"""How the command line fails: one line `smoe-lab: error: ...`, exit 2, and nothing left at a new output path.

Library code raises ValueError / FileNotFoundError (bad input), FloatingPointError (a NaN loss) or OSError (the
file system); `USER_ERRORS` is what `smoe_lab.cli.main` turns into one line. A command that writes to an output
path registers it with `track(path)` before writing; when the command fails, every tracked path that did not exist
before it started is removed again, unless it already holds a checkpoint (a NaN at step 500 keeps step 400's).
"""

from __future__ import annotations

import shutil
from pathlib import Path


class NotebookError(RuntimeError):
    """A notebook of the pipeline raised; the message names the notebook, the cell and the error."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError, NotebookError)
_tracked: list[tuple[Path, bool]] = []


def one_line(e: BaseException) -> str:
    """The exception's message on one line (a multi-line message is joined with ' | ')."""
    text = str(e).strip() or type(e).__name__
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def track(path: str | Path | None) -> None:
    """Register an output path of the running command (remembering whether it existed already)."""
    if path is not None:
        p = Path(path).expanduser().absolute()
        _tracked.append((p, p.exists()))


def _holds_checkpoint(p: Path) -> bool:
    return p.is_dir() and any(p.rglob("config.json"))


def snapshot_outputs(args) -> list[tuple[Path, bool]]:
    """Start tracking: the command's --out (when it has one); returns the tracking list."""
    _tracked.clear()
    if getattr(args, "command", None) != "run":  # a failed notebook's executed copy is worth keeping
        track(getattr(args, "out", None))
    return _tracked


def remove_new_outputs(tracked: list[tuple[Path, bool]]) -> None:
    """Remove every tracked path that the failed command created and that holds no checkpoint."""
    for p, existed in tracked:
        if existed or not p.exists() or _holds_checkpoint(p):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    tracked.clear()
