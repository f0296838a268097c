"""`smoe-lab data build`: the paper's pretraining text (CC100 + mC4 English) to GPT-2 token shards, streamed, in
parallel, resumable.

    smoe-lab data build --out DIR --source cc100=/data/cc100/en.txt.xz \
        --source mc4='/data/c4/multilingual/c4-en.*.json.gz' \
        --weights cc100=1,mc4=1 --tokens 40B --val-tokens 10M --workers 64 --seed 0

A folder with meta.json is a corpus: `corpus: DIR` in pretraining params (and `smoe_lab.data.open_corpus(DIR)`)
reads it like a prepared recipe. Layout:

    meta.json                         written last: tokenizer + hashes, sources (files, licences), weights, tokens
                                      per source and split, the shards in use, format version
    build.json                        the build's settings; a rerun with other content settings is refused
    tokenizer/                        GPT-2 BPE: tokenizer.json + smoe_tokenizer.json (`load_tokenizer`), and the
                                      encoder.json / vocab.bpe the fast encoder is built from
    val.bin                           every source's validation tokens, sources in order (`split("val")`)
    <source>/val.bin, val.json        the source's validation shard + manifest (`split("val_<source>")`)
    <source>/train-FFFFF-PPPPP.bin    train shard PPPPP of the source's input file FFFFF (uint16, little-endian),
    <source>/train-FFFFF-PPPPP.json   and its manifest: input file (path, size, mtime, SHA-256), decompressed byte
                                      range, documents, tokens, the shard's SHA-256

What each shard holds is a pure function of its input file and two settings, so any interrupted build (SIGKILL
included) resumes and ends with the same bytes as an uninterrupted one, whatever the number of workers:

- documents: C4 / mC4 JSON Lines records (`text`), CC100 paragraphs up to a blank line (`smoe_lab.data.readers`),
  cleaned as every corpus here (surrounding whitespace stripped, literal <|endoftext|> removed, empty ones
  skipped); each document's GPT-2 ids are followed by one <|endoftext|> (50256);
- validation (fixed, never in train): the first documents of each source's first input file, up to the first
  document at which the validation tokens reach --val-tokens M; that file's train shards start after them;
- train shards: an input file's documents after that, cut after the first document at which a shard reaches
  --shard-tokens; a shard is written under a temporary name, renamed, then its manifest is written (a shard
  without a manifest is redone);
- share of N: source s gets T_s = round(N * w_s / sum(w)) train tokens; its stream is its shards in (file, shard)
  order cut at exactly T_s tokens (meta.json records the tokens used of each shard). A source stops being read
  once the shards before the one in progress cover T_s; shards a parallel worker wrote past the cut are deleted
  when the build finishes, so the folder is the same for any --workers.

Work is one input file per task on K processes; a file's reader streams (memory does not grow with the corpus),
and while fewer files than processes are left (one 300 GB `en.txt.xz`), a process tokenizes on several threads.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from smoe_lab.data import readers
from smoe_lab.data.corpus import FORMAT_VERSION, clean_document, write_json
from smoe_lab.data.tokenizer import GPT2_ORIGIN, GPT2_SHA256, GPT2_VOCAB_SIZE, GPT2Tokenizer, atomic_write_bytes

BUILD_FORMAT = "smoe-lab-shards"
BUILD_VERSION = 1
DTYPE = np.dtype("<u2")  # GPT-2 ids < 65,536
EOT_ID = GPT2_VOCAB_SIZE - 1
DEFAULT_SHARD_TOKENS = 1 << 27  # ~134M tokens (256 MiB) per shard
DEFAULT_VAL_TOKENS = 10_000_000
BATCH_CHARS = 1 << 20  # documents are tokenized in batches of ~1M characters
TOKENIZER_DIR = "tokenizer"
LOCK = ".build.lock"
# Tokens per input byte, to guess how many files a source needs before any is finished (then measured).
DEFAULT_TOKENS_PER_BYTE = {"gzip": 0.5, "xz": 0.8, None: 0.22}
KNOWN_LICENCES = {
    "c4": "ODC-BY 1.0 (allenai/c4; also bound by the Common Crawl terms of use)",
    "mc4": "ODC-BY 1.0 (allenai/c4 en-multi, mC4 English; also bound by the Common Crawl terms of use)",
    "cc100": "unknown: Common Crawl text (CC-100, statmt.org/cc-100); the Common Crawl terms of use apply",
}
SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


def parse_count(text: str | int, what: str = "count") -> int:
    """An integer from '40000000000', '40B', '10M', '2.5k' or '4e10'."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    mult = 1
    if s and s[-1] in SUFFIXES:
        s, mult = s[:-1], SUFFIXES[s[-1]]
    try:
        value = float(s) * mult
    except ValueError:
        raise ValueError(f"{what}: not a number: {text!r} (use e.g. 40000000000, 40B, 10M)") from None
    if value != int(value):
        raise ValueError(f"{what}: not a whole number of tokens: {text!r}")
    return int(value)


def parse_sources(pairs: Sequence[str]) -> dict[str, list[str]]:
    """['cc100=/d/en.txt.xz', 'mc4=/d/c4-en.*.json.gz', 'mc4=more/*.json.gz'] -> {name: [patterns]} in order."""
    out: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, pattern = pair.partition("=")
        name = name.strip()
        if not sep or not name or not pattern:
            raise ValueError(f"--source expects NAME=PATH_OR_GLOB, got {pair!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"--source name {name!r}: use letters, digits, '_', '-', '.' (it names a folder)")
        out.setdefault(name, []).append(pattern)
    if not out:
        raise ValueError("no --source given: pass at least one NAME=PATH_OR_GLOB")
    return out


def parse_weights(text: str | Mapping[str, float] | None, names: Sequence[str]) -> dict[str, float]:
    """'cc100=1,mc4=3' (or a mapping) -> {name: weight / sum}; None -> equal weights."""
    if text is None:
        raw = {n: 1.0 for n in names}
    elif isinstance(text, Mapping):
        raw = {str(k): float(v) for k, v in text.items()}
    else:
        raw = {}
        for item in str(text).split(","):
            name, sep, w = item.partition("=")
            if not sep:
                raise ValueError(f"--weights expects NAME=W,NAME=W, got {text!r}")
            try:
                raw[name.strip()] = float(w)
            except ValueError:
                raise ValueError(f"--weights: weight of {name.strip()!r} is not a number: {w!r}") from None
    unknown, missing = sorted(set(raw) - set(names)), [n for n in names if n not in raw]
    if unknown:
        raise ValueError(f"--weights names unknown source(s) {unknown}; sources: {', '.join(names)}")
    if missing:
        raise ValueError(f"--weights gives no weight for source(s) {missing}")
    if any(not np.isfinite(w) or w <= 0 for w in raw.values()):
        raise ValueError(f"--weights must all be positive numbers, got {raw}")
    total = sum(raw.values())
    return {n: raw[n] / total for n in names}


def budgets(tokens: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Train tokens per source: the share of `tokens` by weight, rounded so that they sum to `tokens`."""
    names = list(weights)
    exact = np.array([tokens * weights[n] for n in names])
    base = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - base), kind="stable")  # largest remainders get the leftover tokens
    base[order[: tokens - int(base.sum())]] += 1
    return {n: int(b) for n, b in zip(names, base)}


@dataclass
class Source:
    name: str
    patterns: list[str]
    files: list[str]
    weight: float
    budget: int
    licence: str

    @property
    def dir(self) -> str:
        return self.name


@dataclass
class Settings:
    """What a shard's content depends on (besides its input file): a rerun must match these exactly."""

    builder: str = f"{BUILD_FORMAT}/{BUILD_VERSION}"
    tokenizer: str = "gpt2 encoder.json:{} vocab.bpe:{}".format(GPT2_SHA256["encoder.json"], GPT2_SHA256["vocab.bpe"])
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_tokens: int = DEFAULT_VAL_TOKENS
    text_field: str = "text"


def resolve_sources(
    patterns: Mapping[str, Sequence[str]], weights: Mapping[str, float], tokens: int, licences: Mapping[str, str]
) -> list[Source]:
    """Expand every source's patterns to files (sorted per pattern, duplicates dropped) and check them all before
    anything is written: a name without files, a missing file or an unknown format is one error."""
    share = budgets(tokens, weights)
    out = []
    for name, pats in patterns.items():
        files: list[str] = []
        for pat in pats:
            found = readers.expand(pat)
            if not found and any(c in pat for c in "*?["):
                raise ValueError(f"source {name!r}: no files match {pat!r}")
            for f in found:
                if not readers.is_remote(f) and not Path(f).is_file():
                    raise FileNotFoundError(f"source {name!r}: input file not found: {f}")
                readers.file_format(f)
                if f not in files:
                    files.append(f)
        if not files:
            raise ValueError(f"source {name!r} has no input files")
        licence = licences.get(name) or KNOWN_LICENCES.get(name.lower(), "not given (pass --licence NAME=TEXT)")
        out.append(Source(name, list(pats), files, weights[name], share[name], licence))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Shard files and manifests
# ---------------------------------------------------------------------------------------------------------------


def train_name(file_index: int, part: int) -> str:
    return f"train-{file_index:05d}-{part:05d}"


_TRAIN = re.compile(r"^train-(\d{5})-(\d{5})\.json$")


def read_manifest(path: Path) -> dict | None:
    """A finished shard's manifest, or None when the shard is unfinished (no manifest, or the .bin does not
    hold the tokens the manifest says)."""
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    shard = path.with_suffix(".bin")
    if not shard.is_file() or shard.stat().st_size != man.get("tokens", -1) * DTYPE.itemsize:
        return None
    return man


def _manifest_bytes(man: dict) -> bytes:
    return (json.dumps(man, indent=2, sort_keys=True) + "\n").encode("utf-8")


class ShardWriter:
    """Appends document token arrays to `<stem>.bin` under a temporary name; `finish` renames it into place and
    then writes `<stem>.json` (the manifest, written last: a shard is finished when its manifest is there)."""

    def __init__(self, folder: Path, stem: str, start: int):
        self.final = folder / f"{stem}.bin"
        self.manifest = folder / f"{stem}.json"
        self.tmp = folder / f".{stem}.bin.tmp-{os.getpid()}"
        self.f = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.start = self.end = start
        self.docs = self.tokens = 0

    def add(self, ids: np.ndarray, end: int) -> None:
        data = ids.astype(DTYPE).tobytes()  # ids [n] + eot, little-endian uint16
        self.f.write(data)
        self.hash.update(data)
        self.docs += 1
        self.tokens += len(ids)
        self.end = end

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def finish(self, **fields) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)
        man = {
            "shard": self.final.name,
            "start_offset": self.start,
            "end_offset": self.end,
            "docs": self.docs,
            "tokens": self.tokens,
            "sha256": self.hash.hexdigest(),
            **fields,
        }
        atomic_write_bytes(self.manifest, _manifest_bytes(man))
        return man


# ---------------------------------------------------------------------------------------------------------------
# Worker: one input file
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FileTask:
    source: str
    file_index: int
    slot: int  # this file's index in the shared arrays; the source's files are slot0 .. slot0 + n - 1
    slot0: int
    path: str
    out_dir: str
    settings: Settings
    budget: int
    need_val: bool
    start_offset: int
    parts: list[dict] = field(default_factory=list)  # finished shards of this file, in order
    identity: dict | None = None


class _Stop(Exception):
    """The file is no longer needed past its finished shards (its source's share is covered)."""


class _Abort(Exception):
    """The build is being stopped (an error elsewhere, or the parent process died)."""


_STATE: dict = {}  # per process: shared arrays, the encoder, the parent's pid


def _init_worker(known, progress, control, workers: int, watch_parent: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ppid = os.getppid() if watch_parent else None  # a worker whose parent dies is re-parented: it then stops
    _STATE.update(known=known, progress=progress, control=control, workers=workers, ppid=ppid)


def _encoder(out_dir: str):
    enc = _STATE.get("encoder")
    if enc is None or _STATE.get("encoder_dir") != out_dir:
        from smoe_lab.data.gpt2_fast import FastGPT2

        enc = _STATE["encoder"] = FastGPT2(Path(out_dir) / TOKENIZER_DIR)
        _STATE["encoder_dir"] = out_dir
    return enc


def _known_prefix(task: FileTask) -> int | None:
    """Train tokens of the source's files before this one, when all of them are finished (else None)."""
    if task.file_index == 0:
        return 0
    known = np.frombuffer(_STATE["known"], dtype=np.int64)[task.slot0 : task.slot]
    return None if (known < 0).any() else int(known.sum())


def _threads() -> int:
    busy = max(1, int(_STATE["control"][1]))
    return max(1, _STATE["workers"] // busy)


def _check_control() -> None:
    if _STATE["control"][0]:
        raise _Abort("build stopped")
    if _STATE.get("ppid") is not None and os.getppid() != _STATE["ppid"]:
        raise _Abort("the build's main process is gone")


def _encoded_documents(task: FileTask, start: int, on_batch) -> Iterator[tuple[np.ndarray, int]]:
    """(ids of one document followed by eot [n + 1] uint32, end offset), tokenized in batches; `on_batch()` runs
    before each batch (it raises to stop)."""
    enc = _encoder(task.out_dir)
    texts: list[str] = []
    ends: list[int] = []
    chars = 0

    def flush():
        on_batch()
        for ids, end in zip(enc.encode_batch(texts, threads=_threads()), ends):
            yield np.append(ids, np.uint32(EOT_ID)), end

    for raw, end in readers.iter_documents(task.path, start, task.settings.text_field):
        text = clean_document(raw)
        if not text:
            continue
        texts.append(text)
        ends.append(end)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield from flush()
            texts, ends, chars = [], [], 0
    if texts:
        yield from flush()


def build_file(task: FileTask) -> dict:
    """Write the (remaining) shards of one input file; returns {"slot", "val", "parts", "eof"}.

    Stops after the shard in which its source's share is reached (once the files before it are finished), or at
    once when finished shards already cover it; a shard in progress is then discarded (it is not needed).
    """
    s = task.settings
    folder = Path(task.out_dir) / task.source
    ident = task.identity or readers.identify(task.path).as_dict()
    common = {"source": task.source, "input": ident, "settings": asdict(s)}
    parts = list(task.parts)
    done_tokens = sum(p["tokens"] for p in parts)
    progress = _STATE["progress"]
    progress[task.slot] = done_tokens  # train tokens written so far (for the main process's progress bar)
    writer: ShardWriter | None = None

    def needed_so_far() -> bool:  # True when the finished shards already cover the source's share
        prefix = _known_prefix(task)
        return prefix is not None and prefix + done_tokens >= task.budget

    def on_batch() -> None:
        _check_control()
        if writer is not None and writer.manifest.name != "val.json" and needed_so_far():
            raise _Stop

    val = None
    eof = False
    ahead: list = []  # one document read ahead: whether a shard is the file's last depends on the file alone

    def next_doc():
        return ahead.pop() if ahead else next(docs, None)

    try:
        if needed_so_far():
            raise _Stop
        docs = _encoded_documents(task, task.start_offset, on_batch)
        if task.need_val:
            writer = ShardWriter(folder, "val", task.start_offset)
            while writer.tokens < s.val_tokens:
                if (d := next_doc()) is None:
                    raise ValueError(
                        f"source {task.source!r}: its first input file {task.path} holds only {writer.tokens:,} "
                        f"tokens, fewer than --val-tokens {s.val_tokens:,} (validation comes from the first file)"
                    )
                writer.add(*d)
            val = writer.finish(**common, split="val", file_index=task.file_index)
            writer = None
        while not eof:
            if needed_so_far():
                raise _Stop
            start = parts[-1]["end_offset"] if parts else (val["end_offset"] if val else task.start_offset)
            writer = ShardWriter(folder, train_name(task.file_index, len(parts)), start)
            while writer.tokens < s.shard_tokens and (d := next_doc()) is not None:
                writer.add(*d)
                progress[task.slot] = done_tokens + writer.tokens
            if (d := next_doc()) is not None:
                ahead.append(d)
            eof = d is None
            if writer.docs == 0:  # nothing left after the validation set
                writer.discard()
            else:
                fields = dict(split="train", file_index=task.file_index, part=len(parts), eof=eof)
                parts.append(writer.finish(**common, **fields))
                done_tokens += parts[-1]["tokens"]
            writer = None
    except _Stop:
        pass
    except ValueError:  # a damaged input: none of its shards can be trusted (a fixed file is rebuilt anyway)
        for man in ([val] if val else []) + parts + ([{"shard": "val.bin"}] if task.need_val else []):
            (folder / man["shard"]).unlink(missing_ok=True)
            (folder / man["shard"]).with_suffix(".json").unlink(missing_ok=True)
        raise
    finally:
        if writer is not None:
            writer.discard()
    return {"slot": task.slot, "val": val, "parts": parts, "eof": eof}


def _run_task(task: FileTask) -> dict:
    """build_file in a worker process: control exits become a result, errors a ValueError naming the file."""
    try:
        return build_file(task)
    except _Abort:
        return {"slot": task.slot, "aborted": True}
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # a reader error we did not foresee: keep the file in the message
        raise ValueError(f"input file {task.path}: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Main process: scan, schedule, finalize
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FileState:
    source: Source
    index: int
    slot: int
    path: str
    size: int
    compression: str | None
    parts: list[dict] = field(default_factory=list)
    val: dict | None = None
    eof: bool = False
    complete: bool = False  # eof, or stopped because its source's share was reached
    running: bool = False

    @property
    def tokens(self) -> int:
        return sum(p["tokens"] for p in self.parts)


_HASHES: dict[str, str] = {}


def _same_input(man: dict, path: str, size: int, mtime: int | None) -> bool:
    """The manifest's input is this file: same path and size, and same mtime or else the same SHA-256."""
    inp = man.get("input", {})
    if inp.get("path") != path or inp.get("size") != size:
        return False
    if mtime is None or inp.get("mtime_ns") == mtime:
        return True
    if path not in _HASHES:  # touched or copied: compare contents
        _HASHES[path] = readers.sha256_file(path)
    return inp.get("sha256") == _HASHES[path]


def _remove_temporaries(folder: Path) -> None:
    """Files a killed build left half-written: shards (`.x.bin.tmp-PID`) and atomic writes (`.x.json.XXXX.tmp`)."""
    for tmp in list(folder.glob(".*.tmp-*")) + list(folder.glob(".*.tmp")):
        tmp.unlink(missing_ok=True)


def _scan(out: Path, src: Source, settings: Settings, states: list[FileState]) -> None:
    """Load the finished shards of a source's files; delete stale ones (other input, other settings)."""
    folder = out / src.dir
    folder.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(folder)
    by_file: dict[int, dict[int, dict]] = {}
    for path in folder.glob("train-*.json"):
        m = _TRAIN.match(path.name)
        man = read_manifest(path) if m else None
        if man is None or man.get("settings") != asdict(settings):
            path.unlink(missing_ok=True)
            path.with_suffix(".bin").unlink(missing_ok=True)
            continue
        by_file.setdefault(int(m.group(1)), {})[int(m.group(2))] = man
    val = read_manifest(folder / "val.json")
    stats = {}

    def stat(st: FileState):
        if st.index not in stats:
            stats[st.index] = readers.stat_file(st.path)
        return stats[st.index]

    if val is not None and not (
        val.get("settings") == asdict(settings) and _same_input(val, states[0].path, *stat(states[0]))
    ):
        val = None
    states[0].val = val
    for st in states:
        found = by_file.pop(st.index, {})
        size, mtime = stat(st) if found else (st.size, None)
        for j in range(len(found)):  # contiguous from shard 0, same input; the rest is stale
            man = found.get(j)
            if man is None or not _same_input(man, st.path, size, mtime) or (st.index == 0 and val is None):
                break
            st.parts.append(man)
        keep = {p["shard"] for p in st.parts}
        for man in found.values():
            if man["shard"] not in keep:
                (folder / man["shard"]).unlink(missing_ok=True)
                (folder / man["shard"]).with_suffix(".json").unlink(missing_ok=True)
        st.eof = bool(st.parts) and bool(st.parts[-1].get("eof"))
        st.complete = st.eof
    acc = 0
    for st in states:  # the file whose finished shards reach the share is complete too (nothing left to read)
        acc += st.tokens
        if acc >= src.budget:
            st.complete = True
            break
        if not st.complete:
            break
    for idx, found in by_file.items():  # shards of files no longer in the source's list
        for man in found.values():
            (folder / man["shard"]).unlink(missing_ok=True)
            (folder / man["shard"]).with_suffix(".json").unlink(missing_ok=True)


def _cut(states: list[FileState], budget: int) -> tuple[str, int]:
    """("covered", last file index) when finished shards reach the budget; ("short", -1) when every file is
    complete and they do not; ("open", first file still to do) otherwise."""
    acc = 0
    for st in states:
        acc += st.tokens
        if acc >= budget:
            return "covered", st.index
        if not st.complete:
            return "open", st.index
    return "short", -1


def _ratio(states: list[FileState], compression: str | None) -> float:
    done = [s for s in states if s.eof and s.compression == compression and s.size > 0]
    if not done:
        return DEFAULT_TOKENS_PER_BYTE[compression]
    return sum(s.tokens + (s.val["tokens"] if s.val else 0) for s in done) / sum(s.size for s in done)


def _candidates(states: list[FileState], budget: int) -> tuple[list[FileState], int]:
    """Files worth starting now (in order), and the source's estimated unmet need."""
    est = 0.0
    out = []
    for st in states:
        if est >= budget:
            break
        if st.complete:
            est += st.tokens
            continue
        guess = max(st.tokens, st.size * _ratio(states, st.compression))
        if not st.running:
            out.append(st)
        est += guess
    return out, int(budget - est)


def _task(out: Path, st: FileState, settings: Settings) -> FileTask:
    need_val = st.index == 0 and st.val is None
    start = st.parts[-1]["end_offset"] if st.parts else (st.val["end_offset"] if st.index == 0 and st.val else 0)
    ident = (st.parts[0] if st.parts else st.val if st.index == 0 and st.val else {}).get("input")
    return FileTask(
        source=st.source.name,
        file_index=st.index,
        slot=st.slot,
        slot0=st.slot - st.index,
        path=st.path,
        out_dir=str(out),
        settings=settings,
        budget=st.source.budget,
        need_val=need_val,
        start_offset=0 if need_val else start,
        parts=list(st.parts),
        identity=ident,
    )


def _pick(sources: list[Source], states: dict[str, list[FileState]]) -> FileState | None:
    best, need = None, None
    for src in sources:
        cands, unmet = _candidates(states[src.name], src.budget)
        if not cands:
            continue
        if states[src.name][0].val is None and not states[src.name][0].running:
            return states[src.name][0]  # every source's first file first: its validation set
        if best is None or unmet > need:
            best, need = cands[0], unmet
    return best


class _Lock:
    def __init__(self, out: Path):
        self.path = out / LOCK

    def __enter__(self):
        self.f = open(self.path, "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise ValueError(f"another `smoe-lab data build` is writing {self.path.parent}") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
        return False


def _prepare_out(out: Path, settings: Settings, sources: list[Source], force: bool) -> bool:
    """Create or reuse the output folder; returns True when this build created it."""
    build_json = out / "build.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not build_json.is_file():
            raise ValueError(f"--out {out} is a non-empty folder that `smoe-lab data build` did not make; pick another")
        if force:
            shutil.rmtree(out)
        else:
            old = json.loads(build_json.read_text(encoding="utf-8")).get("settings")
            if old != asdict(settings):
                diff = {
                    k: (old.get(k) if old else None, v)
                    for k, v in asdict(settings).items()
                    if not old or old.get(k) != v
                }
                raise ValueError(
                    f"--out {out} was built with other settings {diff} (old, new): rerun with the same ones, "
                    "or pass --force to rebuild it"
                )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created


def _write_build_json(out: Path, settings: Settings, sources: list[Source], tokens: int) -> None:
    doc = {
        "format": BUILD_FORMAT,
        "version": BUILD_VERSION,
        "settings": asdict(settings),
        "tokens": tokens,
        "sources": {s.name: {"patterns": s.patterns, "files": s.files, "weight": s.weight} for s in sources},
    }
    write_json(out / "build.json", doc)


def _write_tokenizer(out: Path) -> dict:
    from smoe_lab.data.gpt2_fast import backend_version, write_bpe_files

    folder = out / TOKENIZER_DIR
    tok = GPT2Tokenizer.load()
    tok.save(folder)
    write_bpe_files(folder)
    return tok.describe() | {
        "path": TOKENIZER_DIR,
        "origin": GPT2_ORIGIN,
        "sha256": dict(GPT2_SHA256),
        "encoder": f"{backend_version()} (ids equal to the HF tokenizer in {TOKENIZER_DIR}/tokenizer.json)",
    }


@dataclass
class BuildReport:
    out: Path
    meta: dict
    shards_built: int
    shards_reused: int
    seconds: float


def build(
    out_dir: str | os.PathLike,
    sources: Mapping[str, Sequence[str]] | Sequence[str],
    tokens: int | str,
    weights: str | Mapping[str, float] | None = None,
    val_tokens: int | str = DEFAULT_VAL_TOKENS,
    workers: int | None = None,
    seed: int = 0,
    shard_tokens: int | str = DEFAULT_SHARD_TOKENS,
    text_field: str = "text",
    licences: Mapping[str, str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Build (or finish, or verify) a sharded GPT-2 corpus in `out_dir`; see the module docstring.

    sources: {name: [path or glob, ...]} or ["name=glob", ...]. tokens: train tokens N over all sources (shares by
    `weights`, default equal). val_tokens: validation tokens per source. seed: the sample plan's seed, recorded in
    meta.json (shards do not depend on it). Bad input raises ValueError / FileNotFoundError before anything is written.
    With workers > 1 the processes come from a multiprocessing fork server: a script that calls this needs the usual
    `if __name__ == "__main__":` guard (the `smoe-lab` command and notebooks need nothing).
    """
    t0 = time.perf_counter()
    patterns = parse_sources(sources) if not isinstance(sources, Mapping) else {k: list(v) for k, v in sources.items()}
    if not patterns:
        raise ValueError("no sources given")
    tokens = parse_count(tokens, "--tokens")
    val_tokens = parse_count(val_tokens, "--val-tokens")
    shard_tokens = parse_count(shard_tokens, "--shard-tokens")
    if tokens < 1 or val_tokens < 1 or shard_tokens < 1:
        raise ValueError(
            f"--tokens, --val-tokens and --shard-tokens must be >= 1, got {tokens}, {val_tokens}, {shard_tokens}"
        )
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    w = parse_weights(weights, list(patterns))
    srcs = resolve_sources(patterns, w, tokens, licences or {})
    for src in srcs:
        for f in src.files:
            readers.check_file(f, text_field)
    settings = Settings(shard_tokens=shard_tokens, val_tokens=val_tokens, text_field=text_field)
    out = Path(out_dir)
    created = _prepare_out(out, settings, srcs, force)
    try:
        with _Lock(out):
            (out / "meta.json").unlink(missing_ok=True)  # incomplete until the new one lands
            for folder in (out, out / TOKENIZER_DIR):
                _remove_temporaries(folder)
            _write_build_json(out, settings, srcs, tokens)
            tok_meta = _write_tokenizer(out)
            states = {}
            slot = 0
            for src in srcs:
                states[src.name] = []
                for i, f in enumerate(src.files):
                    size, _ = readers.stat_file(f)
                    states[src.name].append(FileState(src, i, slot, f, size, readers.file_format(f)[1]))
                    slot += 1
                _scan(out, src, settings, states[src.name])
            reused = sum(len(st.parts) + (st.val is not None) for sts in states.values() for st in sts)
            built = _schedule(out, srcs, states, settings, workers, progress)
            meta = _finalize(out, srcs, states, settings, tokens, w, seed, tok_meta, t0)
    except BaseException:
        if created and not any(p for s in srcs for p in (out / s.dir).glob("*.json")):
            shutil.rmtree(out, ignore_errors=True)  # nothing finished: leave nothing behind
        else:
            for folder in [out, out / TOKENIZER_DIR, *(out / s.dir for s in srcs)]:
                _remove_temporaries(folder)
        raise
    return BuildReport(out, meta, built, reused, time.perf_counter() - t0)


def _schedule(
    out: Path,
    sources: list[Source],
    states: dict[str, list[FileState]],
    settings: Settings,
    workers: int,
    progress: bool,
) -> int:
    """Run file tasks until every source's share is covered (or its files run out); returns shards written."""
    n = sum(len(v) for v in states.values())
    # forkserver: workers fork from a clean single-threaded server that imported this module once
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    known = ctx.RawArray("q", n)
    prog = ctx.RawArray("q", n)
    control = ctx.RawArray("q", 2)  # [abort, busy workers]
    for sts in states.values():
        for st in sts:
            known[st.slot] = st.tokens if st.complete else -1
            prog[st.slot] = st.tokens
    total = sum(s.budget for s in sources)
    bar = tqdm(total=total, desc="build (train tokens)", unit="tok", unit_scale=True, disable=not progress)
    built = 0

    def absorb(st: FileState, res: dict) -> None:
        nonlocal built
        built += (len(res["parts"]) - len(st.parts)) + (res["val"] is not None)
        st.parts = res["parts"]
        if res["val"] is not None:
            st.val = res["val"]
        st.eof = res["eof"]
        st.complete = True  # ended, or stopped because the source's share is covered
        known[st.slot] = st.tokens

    def show() -> None:
        written = np.frombuffer(prog, dtype=np.int64)
        bar.n = sum(min(src.budget, int(sum(written[st.slot] for st in states[src.name]))) for src in sources)
        bar.refresh()

    if workers == 1:
        _init_worker(known, prog, control, 1, False)
        while (st := _pick(sources, states)) is not None:
            control[1] = 1
            res = build_file(_task(out, st, settings))
            absorb(st, res)
            show()
        bar.close()
        return built

    running: dict = {}
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(known, prog, control, workers, True)
    )
    try:
        while True:
            while len(running) < workers and (st := _pick(sources, states)) is not None:
                st.running = True
                running[pool.submit(_run_task, _task(out, st, settings))] = st
            if not running:
                break
            control[1] = len(running)
            finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                st = running.pop(fut)
                st.running = False
                try:
                    res = fut.result()  # a worker's ValueError is raised here
                except BrokenProcessPool:
                    raise ValueError(
                        "a build worker died (killed, or out of memory); rerun the command to resume"
                    ) from None
                if res.get("aborted"):
                    raise ValueError("a build worker stopped unexpectedly")
                absorb(st, res)
            show()
    except BaseException:
        control[0] = 1  # workers discard their shard in progress and return
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    return built


def _finalize(
    out: Path,
    sources: list[Source],
    states: dict[str, list[FileState]],
    settings: Settings,
    tokens: int,
    weights: dict[str, float],
    seed: int,
    tok_meta: dict,
    t0: float,
) -> dict:
    """Cut every source at its share, delete shards past the cut, write val.bin and meta.json."""
    shards: dict[str, list[dict]] = {}
    val_files: dict[str, str] = {}
    by_source: dict[str, dict] = {}
    docs: dict[str, dict] = {}
    inputs: dict[str, list[dict]] = {}
    for src in sources:
        sts = states[src.name]
        status, last = _cut(sts, src.budget)
        if status != "covered":
            have = sum(st.tokens for st in sts)
            raise ValueError(
                f"source {src.name!r} has {have:,} train tokens in its {len(src.files)} file(s), fewer than its share "
                f"{src.budget:,} of --tokens {tokens:,}: add files or lower --tokens (finished shards are kept)"
            )
        used_list, acc, n_docs = [], 0, 0
        for st in sts:
            for p in st.parts:
                if st.index > last or acc >= src.budget:  # past the cut: written by a speculating worker
                    (out / src.dir / p["shard"]).unlink(missing_ok=True)
                    (out / src.dir / p["shard"]).with_suffix(".json").unlink(missing_ok=True)
                    continue
                use = min(p["tokens"], src.budget - acc)
                acc += use
                n_docs += p["docs"]
                used_list.append(
                    {"file": f"{src.dir}/{p['shard']}", "tokens": p["tokens"], "used": use, "sha256": p["sha256"]}
                )
        assert acc == src.budget, (src.name, acc, src.budget)
        shards[src.name] = used_list
        val = sts[0].val
        val_files[src.name] = f"{src.dir}/val.bin"
        by_source[src.name] = {"train": src.budget, "val": val["tokens"], "heldout": 0}
        docs[src.name] = {"available": None, "train": n_docs, "val": val["docs"], "heldout": 0, "dropped_by_cap": 0}
        inputs[src.name] = [
            st.parts[0]["input"] if st.parts else st.val["input"] if st.val else {"path": st.path, "size": st.size}
            for st in sts[: last + 1]
        ]
    # val.bin: the sources' validation shards concatenated in source order (kept when it already holds that)
    h = hashlib.sha256()
    for src in sources:
        h.update((out / val_files[src.name]).read_bytes())
    if not (out / "val.bin").is_file() or readers.sha256_file(str(out / "val.bin")) != h.hexdigest():
        atomic_write_bytes(out / "val.bin", b"".join((out / val_files[s.name]).read_bytes() for s in sources))
    val_total = sum(by_source[s.name]["val"] for s in sources)
    meta = {
        "format_version": FORMAT_VERSION,
        "builder": {"format": BUILD_FORMAT, "version": BUILD_VERSION, "settings": asdict(settings)},
        "recipe": None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "seed": seed,
        "tokenizer": tok_meta,
        "dtype": "uint16",
        "block_size": 1024,
        "domains": [s.name for s in sources],
        "weights": weights,
        "tokens_requested": tokens,
        "val_tokens_requested": settings.val_tokens,
        "tokens": {"train": tokens, "val": val_total},
        "blocks": {"train": tokens // 1024, "val": max(0, (val_total - 1) // 1024)},
        "tokens_by_domain": by_source,
        "documents": docs,
        "files": {"val": "val.bin"} | {f"val_{n}": p for n, p in val_files.items()},
        "shards": shards,
        "sharded_splits": ["train"],
        "sha256": {"val.bin": h.hexdigest()} | {f"val_{s.name}": states[s.name][0].val["sha256"] for s in sources},
        "splitting": {
            "validation": "per source: the first documents of its first input file, up to the first document at "
            "which they reach val_tokens_requested tokens; never in train (that file's train shards start after them)",
            "share": "source s gets round(tokens * weight_s) train tokens: its shards in (file, shard) order cut at "
            "exactly that many tokens (shards[s][i].used)",
        },
        "packing": "each document's GPT-2 ids followed by <|endoftext|> (50256); documents concatenated in input order "
        "per shard; training samples come from smoe_lab.data.plan.SamplePlan (block_size windows within a shard)",
        "sources": {
            s.name: {
                "patterns": s.patterns,
                "files": len(s.files),
                "inputs_used": inputs[s.name],
                "licence": s.licence,
                "formats": sorted({readers.file_format(f)[0] for f in s.files}),
                "text_field": settings.text_field,
            }
            for s in sources
        },
    }
    write_json(out / "meta.json", meta)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def run_from_args(args: argparse.Namespace) -> BuildReport:
    licences = {}
    for item in args.licence:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--licence expects NAME=TEXT, got {item!r}")
        licences[name.strip()] = text
    rep = build(
        args.out,
        parse_sources(args.source),
        args.tokens,
        weights=args.weights,
        val_tokens=args.val_tokens,
        workers=args.workers,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        text_field=args.text_field,
        licences=licences,
        force=args.force,
        progress=not args.no_progress,
    )
    m = rep.meta
    print(
        f"corpus {rep.out}: {m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens in {rep.seconds:.1f}s "
        f"({rep.shards_built} shards written, {rep.shards_reused} reused)"
    )
    for name, c in m["tokens_by_domain"].items():
        print(
            f"  {name:<10} weight {m['weights'][name]:.3f}  train {c['train']:>14,}  val {c['val']:>11,}  "
            f"shards {len(m['shards'][name])}"
        )
    return rep


def main(argv: Sequence[str] | None = None) -> int:
    """`smoe-lab data build ...` (the arguments after `build`); returns the CLI's exit status."""
    from smoe_lab.cli import main as cli_main

    return cli_main(["data", "build", *(argv or [])])
