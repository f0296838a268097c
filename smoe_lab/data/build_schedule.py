"""The build's main process: scan what is on disk, pick the next input file, schedule the workers, cut each
source's stream at its share and write meta.json (`_schedule`, `_finalize`). Used by smoe_lab.data.build."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from smoe_lab.data import readers
from smoe_lab.data.corpus import FORMAT_VERSION, write_json
from smoe_lab.data.tokenizer import atomic_write_bytes

from .build_settings import BUILD_FORMAT, BUILD_VERSION, DEFAULT_TOKENS_PER_BYTE, Settings, Source
from .build_worker import FileTask, _init_worker, _run_task, build_file
from .shards import _TRAIN, read_manifest


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
