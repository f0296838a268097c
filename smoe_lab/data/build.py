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
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from smoe_lab.data import readers
from smoe_lab.data.corpus import write_json
from smoe_lab.data.tokenizer import GPT2_ORIGIN, GPT2_SHA256, GPT2Tokenizer

from .build_schedule import (  # noqa: F401
    FileState,
    _candidates,
    _cut,
    _finalize,
    _pick,
    _ratio,
    _remove_temporaries,
    _same_input,
    _scan,
    _schedule,
    _task,
)
from .build_settings import (  # noqa: F401
    BATCH_CHARS,
    BUILD_FORMAT,
    BUILD_VERSION,
    DEFAULT_SHARD_TOKENS,
    DEFAULT_TOKENS_PER_BYTE,
    DEFAULT_VAL_TOKENS,
    DTYPE,
    EOT_ID,
    KNOWN_LICENCES,
    LOCK,
    SUFFIXES,
    TOKENIZER_DIR,
    Settings,
    Source,
    budgets,
    parse_count,
    parse_sources,
    parse_weights,
    resolve_sources,
)
from .build_worker import (  # noqa: F401
    _STATE,
    FileTask,
    _Abort,
    _check_control,
    _encoded_documents,
    _encoder,
    _init_worker,
    _known_prefix,
    _run_task,
    _Stop,
    _threads,
    build_file,
)
from .gpt2_fast import backend_version, write_bpe_files
from .shards import (  # noqa: F401
    _TRAIN,
    ShardWriter,
    _manifest_bytes,
    read_manifest,
    train_name,
)


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
