"""Small local C4 / mC4 (.json.gz) and CC100 (.txt.xz) files written from the shipped text, for the builder tests."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

from smoe_lab.data import sources
from smoe_lab.data.corpus import clean_document


def shipped_docs(domain: str, start: int, count: int) -> list[str]:
    """`count` documents of a registry domain, from `start`, cleaned and non-empty."""
    docs = [d for d in (clean_document(t) for t in sources.iter_documents(domain)) if d]
    return docs[start : start + count]


def write_c4(path: Path, docs: list[str]) -> list[str]:
    """C4's layout: one JSON object per line with text, timestamp and url; gzip. Returns the documents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"}))
            f.write("\n")
    return docs


def as_paragraphs(doc: str) -> list[str]:
    return [p for p in doc.split("\n") if p.strip()]


def write_cc100(path: Path, docs: list[str]) -> list[str]:
    """CC100's layout: one paragraph per line, a blank line after each document; xz. Returns the documents as the
    reader rebuilds them (paragraphs joined with a newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write("\n".join(as_paragraphs(d)) + "\n\n")
    return [clean_document("\n".join(as_paragraphs(d))) for d in docs]


def write_mix(
    root: Path, c4_files: int = 2, docs_per_file: int = 40, cc100_docs: int = 80
) -> dict[str, list[list[str]]]:
    """root/c4/c4-train.0000N-of-0000M.json.gz (news) and root/cc100/en.txt.xz (legal + biomed).

    Returns {source: [documents of each file, in file order]}."""
    news = shipped_docs("news", 0, c4_files * docs_per_file)
    c4 = [
        write_c4(
            root / "c4" / f"c4-train.{i:05d}-of-{c4_files:05d}.json.gz",
            news[i * docs_per_file : (i + 1) * docs_per_file],
        )
        for i in range(c4_files)
    ]
    half = cc100_docs // 2
    cc = write_cc100(root / "cc100" / "en.txt.xz", shipped_docs("legal", 0, half) + shipped_docs("biomed", 0, half))
    return {"c4": c4, "cc100": [cc]}
