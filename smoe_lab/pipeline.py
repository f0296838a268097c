"""The notebook pipeline: notebooks executed in order with papermill into runs/<name>/.

`run_pipeline("quickstart")` reads params/<notebook>/quick.yaml for notebooks 01-04 (the workbench tour; the
replication study 05 runs on its own), `run_pipeline("ci")` params/<notebook>/ci.yaml for every notebook. It
validates every parameter set before anything runs, executes each notebook into the run folder, and skips
notebooks whose parameters and source are unchanged since their last successful run (once one notebook
re-executes, every later one does too, since it reads its outputs).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import paths
from .config import load_yaml
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


def _stamp(nb_path: Path, params: dict[str, Any]) -> str:
    h = hashlib.sha256(nb_path.read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()


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
    stamps = json.loads(stamps_file.read_text()) if stamps_file.is_file() else {}
    dirty = force
    t_all = time.perf_counter()
    for nb, params in plan.items():
        if only and nb not in only:
            continue
        src, dst = nb_dir / f"{nb}.ipynb", out / f"{nb}.ipynb"
        stamp = _stamp(src, params)
        if not dirty and stamps.get(nb) == stamp and dst.is_file():
            log(f"[{nb}] up to date: {dst}")
            continue
        dirty = True
        log(f"[{nb}] executing -> {dst}")
        t0 = time.perf_counter()
        pm.execute_notebook(
            str(src), str(dst), parameters=params, kernel_name="python3", cwd=str(out), progress_bar=False
        )
        stamps[nb] = stamp
        stamps_file.write_text(json.dumps(stamps, indent=2))
        log(f"[{nb}] done in {time.perf_counter() - t0:.1f}s")
    log(f"pipeline {run_name!r} finished in {time.perf_counter() - t_all:.1f}s: {out}")
    for md in sorted((out / "tables").glob("*.md")):
        log(f"\n== {md.relative_to(out)} ==\n{md.read_text()}")
    figs = sorted((out / "figures").rglob("*.png"))
    if figs:
        log("figures:\n" + "\n".join(f"  {f}" for f in figs))
    return out
