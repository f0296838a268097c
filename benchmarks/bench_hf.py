"""A Switch Transformers model at switch-base-8's width through smoe_lab.hf: seconds per stage, parameter and
file-size drop of calibrate -> uncurl 8 -> 4 -> save.

    python benchmarks/bench_hf.py                       # random weights, d_model 768, d_ff 3072, 12 + 12 blocks
    python benchmarks/bench_hf.py --checkpoint google/switch-base-8 --task boolq   # a real checkpoint (GPU node)

The random model has google/switch-base-8's shape (T5-base backbone, 8 experts in every other block of the encoder
and the decoder, 32128-token vocabulary; ~620M parameters) and is written with save_pretrained first, so `load` is
the same path a hub checkpoint takes. Calibration batches are random token ids [B, T] (both stacks read them: see
smoe_lab.hf.seq2seq) unless --task is given. Each stage is timed over --rounds rounds (median, min-max spread);
the reduced folder is reloaded with the stock SwitchTransformersForConditionalGeneration.from_pretrained.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def switch_base_8_shape(num_experts: int = 8):
    from transformers import SwitchTransformersConfig

    return SwitchTransformersConfig(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=3072,
        num_layers=12,
        num_decoder_layers=12,
        num_sparse_encoder_layers=6,
        num_sparse_decoder_layers=6,
        num_heads=12,
        num_experts=num_experts,
        expert_capacity=64,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def random_batches(n: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (batch_size, seq_len), generator=g) for _ in range(n)]


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.2f} s  ({min(xs):.2f}-{max(xs):.2f})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="an HF folder or hub id (default: a random switch-base-8-shaped model)")
    ap.add_argument("--experts", type=int, default=4, help="D after reduction")
    ap.add_argument("--task", help="calibrate on this task's train inputs instead of random tokens")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="parallel alignments")
    ap.add_argument("--router", default="merge")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from transformers import SwitchTransformersForConditionalGeneration

    from smoe_lab import checkpoint, hf
    from smoe_lab.calibrate import calibrate
    from smoe_lab.reduce import reduce_model

    tmp = Path(tempfile.mkdtemp(prefix="bench_hf-"))
    source = args.checkpoint
    if source is None:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        SwitchTransformersForConditionalGeneration(switch_base_8_shape()).save_pretrained(str(tmp / "base"))
        source = tmp / "base"
        print(f"random switch-base-8-shaped model written in {time.perf_counter() - t0:.1f}s: {source}")
    folder = hf.resolve(source)
    times: dict[str, list[float]] = {k: [] for k in ("load", "calibrate", "reduce", "save", "from_pretrained")}
    stage_times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        t0 = time.perf_counter()
        model = hf.load(folder, device=args.device)
        times["load"].append(time.perf_counter() - t0)
        if args.task:
            from smoe_lab.data.tasks import calibration_batches, load_task

            tok = checkpoint.load_tokenizer(folder)
            examples = load_task(args.task, "train", max_examples=args.batches * args.batch_size)
            batches = calibration_batches(tok, examples, args.batch_size, args.seq_len)
        else:
            batches = random_batches(args.batches, args.batch_size, args.seq_len, model.config.vocab_size)
        t0 = time.perf_counter()
        cal = calibrate(model, batches)
        times["calibrate"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        new, report = reduce_model(model, "uncurl", args.experts, cal, router=args.router, workers=args.workers)
        times["reduce"].append(time.perf_counter() - t0)
        for k, v in report.seconds.items():
            stage_times.setdefault(k, []).append(v)
        t0 = time.perf_counter()
        out = hf.save(new, tmp / "reduced")
        times["save"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stock = SwitchTransformersForConditionalGeneration.from_pretrained(str(out))
        times["from_pretrained"].append(time.perf_counter() - t0)
        n_before, n_after = model.num_params(), new.num_params()
        n_stock = sum(p.numel() for p in stock.parameters())
        del model, new, stock
        print(f"round {r + 1}/{args.rounds} done")
    b0, b1 = folder_bytes(folder), folder_bytes(tmp / "reduced")
    print(
        f"\n{cal.manifest['tokens']:,} calibration tokens ({args.batches} x {args.batch_size} x {args.seq_len}), "
        f"device {args.device}, {torch.get_num_threads()} threads, {args.rounds} rounds (median, min-max)"
    )
    for k, v in times.items():
        print(f"  {k:<16} {_spread(v)}")
    print("  reduce_model stages:")
    for k, v in stage_times.items():
        if k != "total":
            print(f"    {k:<14} {_spread(v)}")
    print(f"experts per MoE layer: {cal.experts_per_layer} -> {report.num_experts}")
    print(f"parameters: {n_before:,} -> {n_after:,} ({1 - n_after / n_before:.1%} fewer; stock reload {n_stock:,})")
    print(f"safetensors: {b0 / 2**20:,.1f} MiB -> {b1 / 2**20:,.1f} MiB ({1 - b1 / b0:.1%} smaller)")


if __name__ == "__main__":
    main()
