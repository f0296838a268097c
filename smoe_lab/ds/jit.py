"""Where DeepSpeed JIT-builds its C++ ops (the CPU all-reduce `deepspeed_shm_comm`, built at process-group start).

torch's JIT builder (torch.utils.cpp_extension.load) guards each op's build folder with a `lock` file and, when it
finds one, waits for it to disappear, with no time limit. A build killed half-way (a process SIGKILLed or ended with
its session during its ~20 s compile) leaves that file behind, and every later process that needs the op then hangs
for ever at `deepspeed.init_distributed`. Two Python environments that share the default folder
(~/.cache/torch_extensions) also rebuild the op in turn, each build replacing the other's.

So, before DeepSpeed starts, `prepare()`:
- gives every Python environment its own build folder, TORCH_EXTENSIONS_DIR = <sys.prefix>/torch_extensions
  (a virtual environment's own folder, made fresh with it), unless the variable is set or sys.prefix is read-only;
- removes build locks older than STALE_LOCK_S (a real build takes well under a minute; 3 minutes seen on 2 loaded
  cores), with a warning naming the file;
- puts the interpreter's own bin folder on PATH when `ninja` (a DeepSpeed dependency, installed into the venv) is
  not on it: `.venv/bin/python -m pytest` runs without an activated venv.

`skip_shm_allreduce()` is for processes that never all-reduce (the expert-parallel profile's ranks, which time
all-to-all and expert compute): DeepSpeed builds the shm op at every process-group start on CPU, ~30 s the first
time in a fresh environment, only to speed up `all_reduce` / `inference_all_reduce`; without it those fall back to
torch.distributed's own all_reduce and nothing else changes.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from pathlib import Path

ENV = "TORCH_EXTENSIONS_DIR"
STALE_LOCK_S = 15 * 60


def extensions_dir(prefix: str | os.PathLike = sys.prefix) -> Path | None:
    """The JIT build root: TORCH_EXTENSIONS_DIR when set, else <prefix>/torch_extensions when prefix is writable
    (set in os.environ so child processes share it), else None (torch's default folder)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    if not os.access(prefix, os.W_OK):
        return None
    root = Path(prefix) / "torch_extensions"
    os.environ[ENV] = str(root)
    return root


def default_root() -> Path:
    """torch's own default build root (~/.cache/torch_extensions, or under XDG_CACHE_HOME)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def clear_stale_locks(root: Path, max_age_s: float = STALE_LOCK_S, now: float | None = None) -> list[Path]:
    """Remove `lock` files of op build folders older than max_age_s; returns them. The folders are root/<op> under
    TORCH_EXTENSIONS_DIR and root/<python>_<device>/<op> under torch's default root."""
    now = time.time() if now is None else now
    removed = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # a build finished meanwhile
            continue
        if age > max_age_s:
            warnings.warn(
                f"removing a stale JIT build lock {lock} ({age / 60:.0f} min old: left by a build that was killed); "
                "without this, DeepSpeed would wait for it for ever",
                stacklevel=2,
            )
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


def ensure_ninja_on_path(executable: str = sys.executable) -> None:
    """Append the interpreter's bin folder to PATH when it holds `ninja` and PATH does not."""
    if shutil.which("ninja"):
        return
    bin_dir = Path(executable).parent
    if (bin_dir / "ninja").is_file():
        os.environ["PATH"] = os.pathsep.join([p for p in (os.environ.get("PATH", ""), str(bin_dir)) if p])


SHM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def skip_shm_allreduce() -> None:
    """Mark DeepSpeed's CPU shm all-reduce op incompatible so that the next process-group start neither builds nor
    loads it (deepspeed.comm.torch.build_shm_op returns None for an incompatible op)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False


def prepare() -> Path | None:
    """Everything above, once per process before deepspeed.init_distributed; returns the build root in use."""
    root = extensions_dir()
    for r in {root or default_root(), default_root()}:
        if r.is_dir():
            clear_stale_locks(r)
    ensure_ninja_on_path()
    return root
