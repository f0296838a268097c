"""Corpus-build throughput: GPT-2 tokens/s per process, end to end (read + decompress + tokenize + write), and the
scaling from 1 to K processes; projected hours for the paper's 40B tokens.

Inputs are written from the shipped text (the registry wheels of `smoe-lab data prepare`) in the two layouts of the
paper's sources: C4 / mC4 JSON Lines (.json.gz) and CC100 paragraphs (.txt.xz). Measured side by side, in
interleaved rounds (median and min-max spread):

  1. the tokenizer alone: tiktoken (the builder's encoder) vs HF tokenizers `encode_batch` (the project's
     GPT2Tokenizer), one thread each, on the same documents; their ids are checked equal;
  2. one process end to end on one file of each format (`smoe_lab.data.build.build_file`: reading, decompression,
     JSON / paragraph parsing, cleaning, tokenizing, hashing and writing shards);
  3. K processes at once, each running `build_file` on its own file (start-up excluded), against one process:
     the scaling efficiency (tokens/s of K) / (K x tokens/s of 1);
  4. whole `smoe_lab.data.build.build` runs on 1 and on K processes (fork server, imports, encoder loading and
     scheduling included), the way `smoe-lab data build` runs.

The projection for 40B tokens uses the per-process rate of 2 and the efficiency of 3.

    python benchmarks/bench_data.py                 # ~24 MB of text, K = 2
    python benchmarks/bench_data.py --mb 200 --workers 16 --rounds 5
    python benchmarks/bench_data.py --quick
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from smoe_lab.data import build as B  # noqa: E402
from smoe_lab.data import sources  # noqa: E402
from smoe_lab.data.corpus import clean_document  # noqa: E402
from smoe_lab.data.gpt2_fast import FastGPT2, write_bpe_files  # noqa: E402
from smoe_lab.data.tokenizer import GPT2Tokenizer  # noqa: E402

PAPER_TOKENS = 40_000_000_000


def shipped_documents() -> list[str]:
    docs = [clean_document(t) for name in sources.DOMAINS for t in sources.iter_documents(name)]
    return [d for d in docs if d]


def write_inputs(root: Path, docs: list[str], mb: float, files: int) -> dict[str, list[Path]]:
    """`files` .json.gz files and `files` .txt.xz files, each of ~mb / (2 files) MB of text (documents repeated)."""
    per_file = mb * 1e6 / (2 * files)
    out: dict[str, list[Path]] = {"c4": [], "cc100": []}
    i = 0
    for f in range(files):
        for kind in ("c4", "cc100"):
            path = root / kind / (f"c4-train.{f:05d}.json.gz" if kind == "c4" else f"en.{f:05d}.txt.xz")
            path.parent.mkdir(parents=True, exist_ok=True)
            opener = gzip.open if kind == "c4" else lzma.open
            size = 0
            with opener(path, "wt", encoding="utf-8") as fh:
                while size < per_file:
                    d = docs[i % len(docs)]
                    i += 1
                    if kind == "c4":
                        fh.write(
                            json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x/"}) + "\n"
                        )
                    else:
                        fh.write("\n".join(p for p in d.split("\n") if p.strip()) + "\n\n")
                    size += len(d)
            out[kind].append(path)
    return out


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs) / 1e6:6.2f}M (min {min(xs) / 1e6:.2f}M, max {max(xs) / 1e6:.2f}M)"


def bench_tokenizers(docs: list[str], rounds: int) -> tuple[list[float], list[float]]:
    fast, ref = FastGPT2(), GPT2Tokenizer.load()
    sample = docs[: max(200, len(docs) // 4)]
    want = ref.encode_batch(sample)
    if [a.tolist() for a in fast.encode_batch(sample)] != want:
        raise SystemExit("tiktoken and the project's GPT-2 tokenizer disagree: not benchmarking")
    n = sum(len(x) for x in want)
    tk, hf = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fast.encode_batch(sample)
        tk.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        ref.encode_batch(sample)
        hf.append(n / (time.perf_counter() - t0))
    return tk, hf


def _setup_worker(out: str, threads: int = 1) -> None:
    """This process ready to run build_file into `out` (shared arrays of its own, the encoder loaded); with
    threads > 1 it tokenizes on that many threads (as a build does while fewer files than processes are left)."""
    ctx = mp.get_context("fork")
    control = ctx.RawArray("q", 2)
    control[1] = 1  # one busy worker: it gets every thread
    B._init_worker(ctx.RawArray("q", 1), ctx.RawArray("q", 1), control, threads, False)
    B._encoder(out)


def _timed_file(path: str, out: str, name: str) -> tuple[int, float, float]:
    """(tokens, start, end) of `build_file` on one whole input file (perf_counter is system-wide on Linux)."""
    (Path(out) / name).mkdir(parents=True, exist_ok=True)
    task = B.FileTask(name, 0, 0, 0, path, out, B.Settings(), budget=1 << 62, need_val=False, start_offset=0)
    t0 = time.perf_counter()
    res = B.build_file(task)
    return sum(p["tokens"] for p in res["parts"]), t0, time.perf_counter()


def _out_dir(tmp: Path, tag: str) -> str:
    out = tmp / tag
    shutil.rmtree(out, ignore_errors=True)
    write_bpe_files(out / B.TOKENIZER_DIR)
    return str(out)


def bench_one_process(path: Path, tmp: Path, threads: int = 1) -> float:
    """Tokens/s of `build_file` on one whole input file, in this process (the encoder loaded before timing)."""
    out = _out_dir(tmp, "one")
    _setup_worker(out, threads)
    n, t0, t1 = _timed_file(str(path), out, "x")
    return n / (t1 - t0)


def bench_reader(path: Path, tokens: int) -> float:
    """Tokens/s the reader alone delivers (decompress + parse + clean, no tokenizing): the ceiling of one file's
    stream however many threads tokenize it (CC100 ships as one en.txt.xz)."""
    t0 = time.perf_counter()
    for text, _ in B.readers.iter_documents(str(path)):
        clean_document(text)
    return tokens / (time.perf_counter() - t0)


def bench_processes(paths: list[Path], tmp: Path, workers: int) -> float:
    """Aggregate tokens/s of `workers` processes, each on its own files at the same time (start-up excluded)."""
    out = _out_dir(tmp, f"many-{workers}")
    with mp.get_context("fork").Pool(workers, initializer=_setup_worker, initargs=(out,)) as pool:
        res = pool.starmap(_timed_file, [(str(p), out, f"f{i}") for i, p in enumerate(paths)])
    return sum(r[0] for r in res) / (max(r[2] for r in res) - min(r[1] for r in res))


def bench_build(files: dict[str, list[Path]], tmp: Path, workers: int, tokens: int) -> float:
    out = tmp / f"build-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    srcs = {k: [str(p) for p in v] for k, v in files.items()}
    t0 = time.perf_counter()
    B.build(out, srcs, tokens=tokens, val_tokens=100_000, workers=workers, shard_tokens=1 << 22, progress=False)
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return (tokens + 200_000) / dt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=24.0, help="MB of text written (half JSON Lines, half CC100 text)")
    ap.add_argument("--workers", type=int, default=2, help="K processes for the scaling measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="8 MB, 2 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.mb, args.rounds = 8.0, 2
    docs = shipped_documents()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        files = write_inputs(tmp / "in", docs, args.mb, files=max(2, args.workers))
        print(
            f"inputs: {args.mb:.0f} MB of shipped text as {len(files['c4'])} .json.gz + {len(files['cc100'])} "
            f".txt.xz files; {os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.1f}"
        )

        tk, hf = bench_tokenizers(docs, args.rounds)
        print("\n1. tokenizer alone, 1 thread, tokens/s (ids checked equal)")
        print(f"   tiktoken           {spread(tk)}")
        print(f"   HF tokenizers      {spread(hf)}")
        print(
            f"   tiktoken / HF      {statistics.median(tk) / statistics.median(hf):.2f}x  -> the builder uses tiktoken"
        )

        per = {"c4": [], "cc100": []}
        for _ in range(args.rounds):
            for kind in per:
                per[kind].append(bench_one_process(files[kind][0], tmp))
        both = [statistics.mean(x) for x in zip(per["c4"], per["cc100"])]
        print("\n2. one process end to end (read + decompress + parse + tokenize + hash + write), tokens/s")
        print(f"   .json.gz (C4/mC4)  {spread(per['c4'])}")
        print(f"   .txt.xz  (CC100)   {spread(per['cc100'])}")
        print(f"   mean of the two    {spread(both)}   (goal: >= 1M per core)")

        cc_tokens = _available(files["cc100"][:1]) + 100_000
        threaded = [bench_one_process(files["cc100"][0], tmp, threads=args.workers) for _ in range(args.rounds)]
        reader = [bench_reader(files["cc100"][0], cc_tokens) for _ in range(args.rounds)]
        print(f"\n   one .txt.xz file, {args.workers} tokenizer threads in 1 process {spread(threaded)}")
        print(f"   its reader alone (xz + paragraphs + cleaning)  {spread(reader)}  <- one file's ceiling")

        mixed = [p for pair in zip(files["c4"], files["cc100"]) for p in pair][: args.workers]
        one, many = [], []
        for _ in range(args.rounds):
            one.append(bench_processes(mixed[:1], tmp, 1))
            many.append(bench_processes(mixed, tmp, args.workers))
        eff = statistics.median(many) / (args.workers * statistics.median(one))
        print(f"\n3. {args.workers} processes at once, each on its own file (start-up excluded), tokens/s in all")
        print(f"   1 process          {spread(one)}")
        print(f"   {args.workers} processes        {spread(many)}")
        print(
            f"   scaling 1 -> {args.workers}       {statistics.median(many) / statistics.median(one):.2f}x "
            f"(efficiency {eff:.0%} of linear)"
        )

        tokens = int(0.9 * 2 * min(_available(files[k]) for k in files))  # equal shares, 10% spare per source
        whole = {1: [], args.workers: []}
        for _ in range(args.rounds):
            for k in whole:
                whole[k].append(bench_build(files, tmp, k, tokens))
        print(f"\n4. whole `build` runs of {tokens / 1e6:.1f}M train tokens (process start-up included), tokens/s")
        for k, xs in whole.items():
            print(f"   {k} process{'es' if k > 1 else '  '}        {spread(xs)}")

        rate, cap = statistics.median(both), statistics.median(reader)
        e = min(eff, 1.0)
        print(
            f"\nprojection for {PAPER_TOKENS / 1e9:.0f}B tokens at {rate / 1e6:.2f}M tokens/s per process and the "
            f"measured {e:.0%} efficiency ({2 * PAPER_TOKENS / 1e9:.0f} GB of uint16 shards):"
        )
        for cores in (16, 64):
            files_h = PAPER_TOKENS / (rate * cores * e) / 3600
            # the paper's 1:1 mix: CC100's 20B come from one en.txt.xz. While mC4's files keep the other cores busy,
            # its process tokenizes on one thread; then on every thread, up to its reader's ceiling.
            half = PAPER_TOKENS / 2
            t_mc4 = half / (rate * (cores - 1) * e)
            left = max(0.0, half - rate * t_mc4)
            cc_h = t_mc4 + left / min(cap, rate * cores * e)  # seconds
            print(
                f"   {cores:>2} cores: {files_h:5.2f} h with enough input files for every core; "
                f"CC100 (one file) + mC4 1:1: {cc_h / 3600:5.2f} h"
            )


def _available(paths: list[Path]) -> int:
    """Train tokens a source's files hold (counted with the fast encoder; val of 100k taken off)."""
    enc = FastGPT2()
    total = 0
    for p in paths:
        total += sum(
            len(enc.encode(clean_document(t))) + 1 for t, _ in B.readers.iter_documents(str(p)) if clean_document(t)
        )
    return total - 100_000


if __name__ == "__main__":
    main()
