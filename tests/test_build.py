"""`smoe-lab data build`: token counts, shares, validation split, resume, SIGKILL + rerun, bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smoe_lab.cli import main
from smoe_lab.data.build import budgets, build, parse_count, parse_weights
from smoe_lab.data.corpus import open_corpus
from smoe_lab.data.tokenizer import GPT2Tokenizer
from tests.build_inputs import shipped_docs, write_c4, write_mix

VAL, SHARD = 2000, 3000


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return root, write_mix(root)


@pytest.fixture(scope="module")
def ref():
    return GPT2Tokenizer.load()


def _sources(root: Path) -> dict[str, list[str]]:
    return {"c4": [str(root / "c4" / "c4-train.*.json.gz")], "cc100": [str(root / "cc100" / "en.txt.xz")]}


def _stream(tok, docs: list[str]) -> np.ndarray:
    """The reference: direct encoding of each document plus one end-of-text."""
    return np.concatenate([np.array(ids + [tok.eot_id], dtype=np.int64) for ids in tok.encode_batch(docs)])


def _read(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<u2").astype(np.int64)


@pytest.fixture(scope="module")
def built(mix, tmp_path_factory):
    root, _ = mix
    out = tmp_path_factory.mktemp("built") / "corpus"
    rep = build(out, _sources(root), tokens=50_000, val_tokens=VAL, shard_tokens=SHARD, workers=1, progress=False)
    return out, rep


def _files(out: Path) -> dict[str, bytes]:
    skip = {"meta.json", ".build.lock"}
    return {
        str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in skip
    }


def test_parsing_helpers():
    assert parse_count("40B") == 40_000_000_000 and parse_count("10M") == 10**7 and parse_count("4e10") == 4 * 10**10
    assert parse_count(123) == 123 and parse_count("2.5k") == 2500
    with pytest.raises(ValueError, match="not a number"):
        parse_count("lots")
    assert parse_weights("a=1,b=3", ["a", "b"]) == {"a": 0.25, "b": 0.75}
    assert parse_weights(None, ["a", "b"]) == {"a": 0.5, "b": 0.5}
    for bad, msg in (("a=1", "no weight for source"), ("a=1,b=1,c=1", "unknown source"), ("a=0,b=1", "positive")):
        with pytest.raises(ValueError, match=msg):
            parse_weights(bad, ["a", "b"])
    assert (
        budgets(10, {"a": 1 / 3, "b": 2 / 3}) == {"a": 3, "b": 7}
        and sum(budgets(40 * 10**9, {"a": 0.3, "b": 0.7}).values()) == 40 * 10**9
    )


def test_token_counts_equal_direct_encoding_plus_one_eot_per_document(built, mix, ref):
    out, rep = built
    _, docs = mix
    meta = rep.meta
    for name, files in docs.items():
        want = _stream(ref, [d for f in files for d in f])  # the source's documents in file order
        val = _read(out / name / "val.bin")
        train = [_read(out / s["file"]) for s in meta["shards"][name]]
        got = np.concatenate([val, *train])
        # val then the train shards are exactly the direct encoding of the documents read, in order ...
        if name == "c4":  # ... across files: file 1's shards follow file 0's
            n0 = len(_stream(ref, files[0]))
            f0 = np.concatenate(
                [val] + [_read(out / s["file"]) for s in meta["shards"][name] if "train-00000" in s["file"]]
            )
            np.testing.assert_array_equal(f0, want[:n0])
            f1 = np.concatenate([_read(out / s["file"]) for s in meta["shards"][name] if "train-00001" in s["file"]])
            np.testing.assert_array_equal(f1, want[n0 : n0 + len(f1)])
        else:
            np.testing.assert_array_equal(got, want[: len(got)])
        # every shard ends at a document boundary, and its manifest counts its documents and tokens
        mans = [json.loads((out / s["file"]).with_suffix(".json").read_text()) for s in meta["shards"][name]]
        for s, man in zip(meta["shards"][name], mans):
            arr = _read(out / s["file"])
            assert arr[-1] == ref.eot_id and (arr == ref.eot_id).sum() == man["docs"] and len(arr) == man["tokens"]
        assert (val == ref.eot_id).sum() == meta["documents"][name]["val"]
        # the share: exactly N * w tokens used, the validation set first and never in train
        assert sum(s["used"] for s in meta["shards"][name]) == meta["tokens_by_domain"][name]["train"] == 25_000
        assert VAL <= len(val) < VAL + 3000
        assert meta["tokens_by_domain"][name]["val"] == len(val)
    # the corpus folder reads like a prepared recipe
    c = open_corpus(out)
    assert c.is_sharded and c.tokenizer.encode("Hello world") == [15496, 995] and c.vocab_size == 50257
    assert len(c.split("train")) == 50_000 and len(c.split("val")) == meta["tokens"]["val"]
    np.testing.assert_array_equal(np.asarray(c.split("val_cc100")), _read(out / "cc100" / "val.bin"))
    # split("train") is one stream over the used prefix of every shard, sources in order (get_batch reads it)
    flat = np.concatenate([_read(out / s["file"])[: s["used"]] for n in meta["domains"] for s in meta["shards"][n]])
    train = c.split("train")
    pos = np.array([[0, 1, 2], [24_999, 25_000, 25_001], [49_997, 49_998, 49_999]])
    np.testing.assert_array_equal(train[pos], flat[pos])
    np.testing.assert_array_equal(train[24_990:25_010], flat[24_990:25_010])
    assert meta["sources"]["cc100"]["licence"].startswith("unknown") and meta["tokenizer"]["sha256"]["vocab.bpe"]


def test_cc100_documents_are_split_at_blank_lines(built, ref):
    out, rep = built
    text = ref.decode(_read(out / "cc100" / "val.bin").tolist())
    pieces = text.split("<|endoftext|>")[:-1]
    assert len(pieces) == rep.meta["documents"]["cc100"]["val"] >= 2
    assert all("\n\n" not in p and p == p.strip() for p in pieces)  # one document per blank-line block


def test_stop_reading_a_source_at_its_share(built, mix):
    out, rep = built
    root, _ = mix
    cc = [json.loads(p.read_text()) for p in sorted((out / "cc100").glob("train-*.json"))]
    assert not cc[-1]["eof"]  # cc100's single file was left unread past its share
    c4 = [json.loads(p.read_text()) for p in sorted((out / "c4").glob("train-00000-*.json"))]
    assert [m["eof"] for m in c4] == [False] * (len(c4) - 1) + [True]  # c4's first file was read to its end
    assert all(a["end_offset"] == b["start_offset"] for a, b in zip(c4, c4[1:]))  # contiguous byte ranges
    raw = __import__("lzma").decompress((root / "cc100" / "en.txt.xz").read_bytes())
    assert cc[-1]["end_offset"] < len(raw)
    used = [s["used"] for s in rep.meta["shards"]["cc100"]]
    assert sum(used[:-1]) < 25_000 <= sum(used[:-1]) + cc[-1]["tokens"]  # the last shard holds the cut


def test_rerun_skips_everything(built, mix):
    out, _ = built
    root, _ = mix
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")}
    rep = build(out, _sources(root), tokens=50_000, val_tokens=VAL, shard_tokens=SHARD, workers=1, progress=False)
    assert rep.shards_built == 0 and rep.shards_reused > 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")} == before
    # other content settings are refused (not silently mixed), --force rebuilds
    with pytest.raises(ValueError, match="built with other settings"):
        build(out, _sources(root), tokens=50_000, val_tokens=VAL + 1, shard_tokens=SHARD, workers=1, progress=False)


def test_sources_mix_in_the_requested_proportion(mix, tmp_path):
    root, _ = mix
    rep = build(
        tmp_path / "c",
        _sources(root),
        tokens=40_000,
        weights="c4=1,cc100=3",
        val_tokens=VAL,
        shard_tokens=SHARD,
        workers=1,
        progress=False,
    )
    assert (
        rep.meta["tokens_by_domain"]["c4"]["train"] == 10_000
        and rep.meta["tokens_by_domain"]["cc100"]["train"] == 30_000
    )
    assert rep.meta["weights"] == {"c4": 0.25, "cc100": 0.75}
    from smoe_lab.data.plan import SamplePlan

    plan = SamplePlan.from_corpus(open_corpus(tmp_path / "c"), block_size=64)
    src, _ = plan.source_of(np.arange(4096))
    assert abs((src == 1).mean() - 0.75) < 0.01
    for batch in src.reshape(-1, 64):  # every global batch of 64 holds 48 +- 1 cc100 samples
        assert abs((batch == 1).sum() - 48) <= 1
    windows = plan.windows_of(np.arange(64))  # and the windows come from the right source's shards
    c4_tokens = set(np.concatenate([_read(tmp_path / "c" / s["file"]) for s in rep.meta["shards"]["c4"]]).tolist())
    assert all(set(w.tolist()) <= c4_tokens for w, s in zip(windows, src[:64]) if s == 0)


KILL_SCRIPT = """
import sys
from smoe_lab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_rerun_gives_byte_identical_shards(tmp_path):
    docs = shipped_docs("news", 0, 600) + shipped_docs("legal", 0, 300)
    for i in range(6):
        write_c4(tmp_path / "in" / f"c4-{i:05d}.json.gz", docs[i::6])
    args = [
        "data",
        "build",
        "--source",
        f"c4={tmp_path}/in/c4-*.json.gz",
        "--tokens",
        "250k",
        "--val-tokens",
        "5k",
        "--shard-tokens",
        "4000",
        "--no-progress",
    ]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, *args, "--out", str(killed), "--workers", "2"],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not list(killed.glob("c4/train-*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the main process, the fork server and both workers
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    assert not (killed / "meta.json").exists() and list(killed.glob("c4/train-*.json"))  # killed mid-build
    again = build(
        killed,
        {"c4": [f"{tmp_path}/in/c4-*.json.gz"]},
        tokens="250k",
        val_tokens="5k",
        shard_tokens=4000,
        workers=2,
        progress=False,
    )
    assert again.shards_reused > 0
    clean = build(
        tmp_path / "clean",
        {"c4": [f"{tmp_path}/in/c4-*.json.gz"]},
        tokens="250k",
        val_tokens="5k",
        shard_tokens=4000,
        workers=1,
        progress=False,
    )  # uninterrupted, and on one process
    assert _files(killed) == _files(tmp_path / "clean")
    strip = ("created", "build_seconds")
    assert {k: v for k, v in again.meta.items() if k not in strip} == {
        k: v for k, v in clean.meta.items() if k not in strip
    }
    assert not list(killed.rglob(".*.tmp*"))


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoe-lab: error: ") and len(err.splitlines()) == 1, err
    return err


def test_bad_input_gives_one_clear_error_and_writes_nothing(mix, tmp_path, capsys):
    root, _ = mix
    out = tmp_path / "out"
    base = [
        "data",
        "build",
        "--out",
        str(out),
        "--tokens",
        "20k",
        "--val-tokens",
        "1k",
        "--workers",
        "1",
        "--no-progress",
    ]
    err = _cli_error(
        capsys, [*base, "--source", f"c4={root}/c4/*.json.gz", "--source", f"cc100={tmp_path}/none.txt.xz"]
    )
    assert "input file not found" in err and "none.txt.xz" in err
    err = _cli_error(capsys, [*base, "--source", f"c4={root}/c4/*.json.gz", "--source", f"cc100={tmp_path}/*.txt.xz"])
    assert "source 'cc100': no files match" in err
    err = _cli_error(capsys, [*base, "--source", f"c4={root}/c4/*.json.gz", "--weights", "c4=1,cc100=1"])
    assert "unknown source" in err and "cc100" in err
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(b"\x00garbage, not gzip" * 100)
    err = _cli_error(capsys, [*base, "--source", f"c4={bad}"])
    assert "corrupt input file" in err and "bad.json.gz" in err
    # damage past the first block is found by the worker that reaches it; its shards are removed, the folder too
    big = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in shipped_docs("news", 0, 999)).encode())
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(big[: int(len(big) * 0.8)])
    err = _cli_error(capsys, [*base, "--source", f"c4={cut}", "--tokens", "2M"])  # a share past the damage
    assert "corrupt input file" in err and "cut.json.gz" in err
    assert not out.exists()
