"""The build's worker: one input file to its train (and validation) shards, resumable, stopped when its source's
share is covered (`build_file`). Runs in the process pool of smoe_lab.data.build."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from smoe_lab.data import readers
from smoe_lab.data.corpus import clean_document

from .build_settings import BATCH_CHARS, EOT_ID, TOKENIZER_DIR, Settings
from .gpt2_fast import FastGPT2
from .shards import ShardWriter, train_name


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
