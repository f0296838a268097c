"""Where things live. Paths are resolved from the package, never from the current directory,
because nbmake runs notebooks in their own folder and papermill in the caller's."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path | None:
    """The source checkout holding this package (editable install), or None for a site-packages install."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").exists() and (root / "notebooks").is_dir() else None


def data_dir() -> Path:
    """Shipped + prepared data. $SMOE_LAB_DATA wins; else <repo>/data; else ~/.cache/smoe_lab/data."""
    if env := os.environ.get("SMOE_LAB_DATA"):
        return Path(env).expanduser().resolve()
    root = repo_root()
    return root / "data" if root else Path.home() / ".cache" / "smoe_lab" / "data"


def prepared_dir() -> Path:
    """Tokenized corpora and task files made by `smoe-lab data prepare` (git-ignored)."""
    return data_dir() / "prepared"


def cache_dir() -> Path:
    """Downloaded registry packages (wheels) that raw data is read from (git-ignored)."""
    return data_dir() / "cache"


def runs_dir() -> Path:
    """Run outputs. $SMOE_LAB_RUNS wins; else <repo>/runs; else ./runs."""
    if env := os.environ.get("SMOE_LAB_RUNS"):
        return Path(env).expanduser().resolve()
    root = repo_root()
    return root / "runs" if root else Path.cwd() / "runs"


def notebooks_dir() -> Path:
    root = repo_root()
    if root is None:
        raise FileNotFoundError("notebooks/ is only available in a source checkout of smoe_lab")
    return root / "notebooks"


def params_dir() -> Path:
    root = repo_root()
    if root is None:
        raise FileNotFoundError("params/ is only available in a source checkout of smoe_lab")
    return root / "params"


def resolve_out_dir(path: str | Path) -> Path:
    """A run folder: absolute paths as given; relative ones against the source checkout (else the cwd), so a
    notebook executed by nbmake (cwd notebooks/) or papermill (cwd anywhere) writes to the same place."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    root = repo_root()
    return ((root if root else Path.cwd()) / p).resolve()
