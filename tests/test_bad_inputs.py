"""Bad input, as a tired user types it, across every subcommand and the notebooks' parameters: each one exits 2
with exactly one line `smoe-lab: error: ...` naming the problem, prints no traceback, and leaves nothing at --out.

Most run in-process through `smoe_lab.cli.main` (fast); a few run the real `smoe-lab` entry point in a subprocess.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smoe_lab import checkpoint, paths
from smoe_lab.calibrate import calibrate
from smoe_lab.cli import main
from smoe_lab.config import ModelConfig
from smoe_lab.data.corpus import iter_eval_batches, open_corpus, prepare
from smoe_lab.model import GPT

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints (MoE, dense, corrupted), a calibration artifact, and files of the wrong kind."""
    root = tmp_path_factory.mktemp("bad")
    corpus = open_corpus(prepare("tiny"))
    tok = corpus.tokenizer
    shape = dict(n_layer=2, d_model=32, n_head=2, d_ff=64, block_size=64)
    moe = checkpoint.save(GPT(ModelConfig.preset("tiny", num_experts=4, **shape)), root / "moe", tokenizer=tok)
    checkpoint.save(GPT(ModelConfig.preset("tiny", **shape)), root / "dense", tokenizer=tok)
    batches = [x for x, _ in iter_eval_batches(corpus.split("val_news"), 2, 64, max_batches=2)]
    cal = calibrate(checkpoint.load(moe), batches).save(root / "cal.safetensors")
    data = cal.read_bytes()
    (root / "cut.safetensors").write_bytes(data[: len(data) // 3])
    (root / "notes.json").write_text('{"not": "an artifact"}')
    (root / "text.sqlite").write_text("this is not a database\n")
    cut = checkpoint.save(GPT(ModelConfig.preset("tiny", num_experts=4, **shape)), root / "cut-ck", tokenizer=tok)
    w = (cut / checkpoint.WEIGHTS).read_bytes()
    (cut / checkpoint.WEIGHTS).write_bytes(w[: len(w) // 2])
    badjson = checkpoint.save(GPT(ModelConfig.preset("tiny", **shape)), root / "badjson", tokenizer=tok)
    (badjson / checkpoint.CONFIG).write_text('{"format_version": 1, "model_config": {')
    (root / "ok.yaml").write_text(
        "model: {n_layer: 2, d_model: 32, n_head: 2, d_ff: 64}\nnum_experts: 2\n"
        "train: {max_steps: 4, batch_size: 2, micro_batch_size: 2, warmup_steps: 0, eval_every: 0}\n"
    )
    (root / "list.yaml").write_text("- preset: tiny\n")
    (root / "broken.yaml").write_text("train: {lr: 1e-3\n")
    (root / "ft_types.yaml").write_text('steps: "ten"\n')
    (root / "empty" / "RTE").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "empty" / "RTE" / f"{split}.jsonl").write_text("")
    pipelines = {
        "unknown_key": "name: x\nbase: ci\nnotebook: {}\n",
        "variants_type": "name: x\nbase: ci\nnotebooks:\n  01_pretrain: {variants: '8'}\n",
        "seeds_short": "name: x\nbase: ci\nnotebooks:\n  02_clusters: {stability_seeds: [0]}\n",
        "warmup": "name: x\nbase: ci\nnotebooks:\n  03_pruning: {finetune: {steps: 5}}\n",
        "warmup_data": "name: x\nbase: ci\nnotebooks:\n  03_pruning: {router_warmup_data: flan}\n",
        "reps": "name: x\nbase: ci\nnotebooks:\n  04_results: {latency_reps: 0}\n",
        "tokens_type": "name: x\nbase: ci\nnotebooks:\n  01_pretrain: {tokens: 1.5e4}\n",
    }
    for name, text in pipelines.items():
        (root / f"pipe_{name}.yaml").write_text(text)
    return root


P = "--params"
PT = ["pretrain", P, "{r}/ok.yaml"]  # a valid small run that each case breaks in one place
CASES = [
    # data
    ("data-recipe", ["data", "prepare", "--recipe", "huge"], "unknown corpus recipe 'huge'"),
    # pretrain
    ("pretrain-missing-params", ["pretrain", P, "{r}/nope.yaml", "--set", "out_dir={out}"], "params file not found"),
    ("pretrain-params-folder", ["pretrain", P, "{r}", "--set", "out_dir={out}"], "is a folder"),
    ("pretrain-params-list", ["pretrain", P, "{r}/list.yaml"], "must hold a mapping"),
    ("pretrain-broken-yaml", ["pretrain", P, "{r}/broken.yaml", "--set", "out_dir={out}"], "is not valid YAML"),
    ("pretrain-lr-word", [*PT, "--set", "train.lr=abc", "--set", "out_dir={out}"], "TrainConfig.lr"),
    ("pretrain-bad-set-yaml", [*PT, "--set", "train.lr=[1,", "--set", "out_dir={out}"], "not valid YAML"),
    ("pretrain-set-no-equals", [*PT, "--set", "train.lr", "--set", "out_dir={out}"], "expects key=value"),
    (
        "pretrain-experts-list-length",
        [*PT, "--set", "num_experts=[4, 4, 4]", "--set", "out_dir={out}"],
        "one count per MoE layer (1), got 3",
    ),
    ("pretrain-corpus", [*PT, "--set", "corpus={r}/nowhere", "--set", "out_dir={out}"], "corpus not found"),
    (
        "pretrain-warmup",
        [*PT, "--set", "train.max_steps=10", "--set", "train.warmup_steps=50", "--set", "out_dir={out}"],
        "warmup_steps: 50 exceeds max_steps=10",
    ),
    ("pretrain-typo", [*PT, "--set", "trian.lr=1", "--set", "out_dir={out}"], "unknown field(s) ['trian']"),
    ("pretrain-train-not-mapping", [*PT, "--set", "train=5", "--set", "out_dir={out}"], "PretrainParams.train"),
    ("pretrain-resume-nothing", [*PT, "--resume", "--set", "out_dir={out}"], "no checkpoint with train state"),
    (
        "pretrain-micro-batch",
        [*PT, "--set", "train.batch_size=10", "--set", "train.micro_batch_size=4", "--set", "out_dir={out}"],
        "multiple of micro_batch_size",
    ),
    ("pretrain-device", [*PT, "--set", "train.device=tpu", "--set", "out_dir={out}"], "TrainConfig.device"),
    (
        "pretrain-nan",
        [*PT, "--set", "train.lr=1.0e+30", "--set", "out_dir={out}", "--no-progress"],
        "non-finite loss at step",
    ),
    # calibrate
    (
        "calibrate-missing-ckpt",
        ["calibrate", "--checkpoint", "{r}/nope", "--task", "boolq", "--out", "{out}"],
        "not a smoe_lab checkpoint",
    ),
    ("calibrate-no-source", ["calibrate", "--checkpoint", "{moe}", "--out", "{out}"], "needs --task NAME or --corpus"),
    (
        "calibrate-task",
        ["calibrate", "--checkpoint", "{moe}", "--task", "boolqq", "--out", "{out}"],
        "unknown task 'boolqq'",
    ),
    (
        "calibrate-split",
        ["calibrate", "--checkpoint", "{moe}", "--task", "boolq", "--split", "test", "--out", "{out}"],
        "unknown split 'test'",
    ),
    (
        "calibrate-dense",
        ["calibrate", "--checkpoint", "{dense}", "--task", "boolq", "--max-examples", "4", "--out", "{out}"],
        "no MoE layers",
    ),
    (
        "calibrate-corpus-split",
        ["calibrate", "--checkpoint", "{moe}", "--corpus", "tiny", "--split", "val_mars", "--out", "{out}"],
        "val_mars",
    ),
    (
        "calibrate-batch-size",
        ["calibrate", "--checkpoint", "{moe}", "--task", "boolq", "--batch-size", "0", "--out", "{out}"],
        "batch_size must be >= 1",
    ),
    (
        "calibrate-ckpt-is-artifact",
        ["calibrate", "--checkpoint", "{r}/cal.safetensors", "--task", "boolq", "--out", "{out}"],
        "is a file",
    ),
    (
        "calibrate-int-flag",
        ["calibrate", "--checkpoint", "{moe}", "--task", "boolq", "--max-examples", "many", "--out", "{out}"],
        "invalid int value: 'many'",
    ),
    # reduce
    (
        "reduce-experts-list-length",
        [
            "reduce",
            "--checkpoint",
            "{moe}",
            "--calibration",
            "{r}/cal.safetensors",
            "--method",
            "uncurl",
            "--experts",
            "[2, 2, 2]",
            "--out",
            "{out}",
        ],
        "num_experts lists 3 layers, the model has 1 MoE layers",
    ),
    (
        "reduce-experts-word",
        [
            "reduce",
            "--checkpoint",
            "{moe}",
            "--calibration",
            "{r}/cal.safetensors",
            "--method",
            "uncurl",
            "--experts",
            "two",
            "--out",
            "{out}",
        ],
        "num_experts must be an int",
    ),
    (
        "reduce-calibration-is-checkpoint",
        [
            "reduce",
            "--checkpoint",
            "{moe}",
            "--calibration",
            "{moe}",
            "--method",
            "uncurl",
            "--experts",
            "2",
            "--out",
            "{out}",
        ],
        "is a folder, not a calibration artifact",
    ),
    (
        "reduce-calibration-truncated",
        [
            "reduce",
            "--checkpoint",
            "{moe}",
            "--calibration",
            "{r}/cut.safetensors",
            "--method",
            "uncurl",
            "--experts",
            "2",
            "--out",
            "{out}",
        ],
        "truncated or corrupted",
    ),
    (
        "reduce-calibration-json",
        [
            "reduce",
            "--checkpoint",
            "{moe}",
            "--calibration",
            "{r}/notes.json",
            "--method",
            "uncurl",
            "--experts",
            "2",
            "--out",
            "{out}",
        ],
        "notes.json",
    ),
    (
        "reduce-router",
        [
            "reduce",
            "--checkpoint",
            "{moe}",
            "--calibration",
            "{r}/cal.safetensors",
            "--method",
            "uncurl",
            "--experts",
            "2",
            "--router",
            "fresh",
            "--out",
            "{out}",
        ],
        "unknown router option 'fresh'",
    ),
    (
        "reduce-dense",
        [
            "reduce",
            "--checkpoint",
            "{dense}",
            "--calibration",
            "{r}/cal.safetensors",
            "--method",
            "uncurl",
            "--experts",
            "2",
            "--out",
            "{out}",
        ],
        "dense model",
    ),
    # finetune
    ("finetune-task", ["finetune", "--checkpoint", "{moe}", "--task", "rtee", "--out", "{out}"], "unknown task 'rtee'"),
    (
        "finetune-lr",
        ["finetune", "--checkpoint", "{moe}", "--task", "rte", "--root", "{fx}", "--set", "lr=-1", "--out", "{out}"],
        "FinetuneConfig.lr",
    ),
    (
        "finetune-warmup",
        ["finetune", "--checkpoint", "{moe}", "--task", "rte", "--root", "{fx}", "--set", "steps=10", "--out", "{out}"],
        "warmup_steps: 500 exceeds steps=10",
    ),
    (
        "finetune-yaml-types",
        [
            "finetune",
            "--checkpoint",
            "{moe}",
            "--task",
            "rte",
            "--root",
            "{fx}",
            P,
            "{r}/ft_types.yaml",
            "--out",
            "{out}",
        ],
        "FinetuneConfig.steps",
    ),
    (
        "finetune-truncated-weights",
        ["finetune", "--checkpoint", "{r}/cut-ck", "--task", "rte", "--root", "{fx}", "--out", "{out}"],
        "truncated or corrupted",
    ),
    (
        "finetune-broken-config",
        ["finetune", "--checkpoint", "{r}/badjson", "--task", "rte", "--root", "{fx}", "--out", "{out}"],
        "config.json is not valid JSON",
    ),
    (
        "finetune-resume-nothing",
        [
            "finetune",
            "--checkpoint",
            "{moe}",
            "--task",
            "rte",
            "--root",
            "{fx}",
            "--set",
            "warmup_steps=0",
            "--resume",
            "--out",
            "{out}",
        ],
        "no checkpoint with train state",
    ),
    (
        "finetune-store-not-sqlite",
        [
            "finetune",
            "--checkpoint",
            "{moe}",
            "--task",
            "rte",
            "--root",
            "{fx}",
            "--store",
            "{r}/text.sqlite",
            "--out",
            "{out}",
        ],
        "not a smoe_lab results store",
    ),
    (
        "finetune-empty-train",
        [
            "finetune",
            "--checkpoint",
            "{moe}",
            "--task",
            "rte",
            "--root",
            "{r}/empty",
            "--set",
            "warmup_steps=0",
            "--out",
            "{out}",
        ],
        "no training examples",
    ),
    (
        "finetune-ckpt-is-store",
        ["finetune", "--checkpoint", "{r}/text.sqlite", "--task", "rte", "--out", "{out}"],
        "is a file",
    ),
    # evaluate
    (
        "evaluate-split",
        ["evaluate", "--checkpoint", "{moe}", "--task", "rte", "--root", "{fx}", "--split", "test"],
        "unknown split 'test'",
    ),
    (
        "evaluate-dev-without-spec",
        ["evaluate", "--checkpoint", "{moe}", "--task", "rte", "--root", "{fx}", "--split", "dev"],
        "has no eval_spec",
    ),
    (
        "evaluate-batch-size",
        ["evaluate", "--checkpoint", "{moe}", "--task", "rte", "--root", "{fx}", "--batch-size", "0"],
        "batch_size must be >= 1",
    ),
    (
        "evaluate-store-folder",
        ["evaluate", "--checkpoint", "{moe}", "--task", "rte", "--root", "{fx}", "--store", "{r}"],
        "is a folder",
    ),
    (
        "evaluate-empty-split",
        ["evaluate", "--checkpoint", "{moe}", "--task", "rte", "--root", "{r}/empty"],
        "no examples to score",
    ),
    (
        "evaluate-cloze-domain",
        ["evaluate", "--checkpoint", "{moe}", "--task", "cloze-mars", "--corpus", "tiny"],
        "unknown domain 'mars'",
    ),
    ("evaluate-missing-ckpt", ["evaluate", "--checkpoint", "{r}/nope", "--task", "rte"], "not a smoe_lab checkpoint"),
    # convert
    (
        "convert-from",
        ["convert", "--from", "onnx", "--to", "native", "--checkpoint", "{moe}", "--out", "{out}"],
        "--from must be one of",
    ),
    (
        "convert-same",
        ["convert", "--from", "native", "--to", "native", "--checkpoint", "{moe}", "--out", "{out}"],
        "nothing to convert",
    ),
    # run and the notebooks' parameters
    ("run-name", ["run", "nosuchlevel", "--out-dir", "{out}"], "no notebook has parameters for it"),
    ("run-missing-file", ["run", P, "{r}/nope.yaml", "--out-dir", "{out}"], "params file not found"),
    ("run-unknown-key", ["run", P, "{r}/pipe_unknown_key.yaml", "--out-dir", "{out}"], "unknown key(s) ['notebook']"),
    ("run-variants-type", ["run", P, "{r}/pipe_variants_type.yaml", "--out-dir", "{out}"], "01_pretrain.variants"),
    ("run-tokens-type", ["run", P, "{r}/pipe_tokens_type.yaml", "--out-dir", "{out}"], "01_pretrain.tokens"),
    ("run-seeds-short", ["run", P, "{r}/pipe_seeds_short.yaml", "--out-dir", "{out}"], "02_clusters.stability_seeds"),
    (
        "run-finetune-warmup",
        ["run", P, "{r}/pipe_warmup.yaml", "--out-dir", "{out}"],
        "03_pruning.finetune: FinetuneConfig.warmup_steps",
    ),
    ("run-warmup-data", ["run", P, "{r}/pipe_warmup_data.yaml", "--out-dir", "{out}"], "03_pruning.router_warmup_data"),
    ("run-latency-reps", ["run", P, "{r}/pipe_reps.yaml", "--out-dir", "{out}"], "04_results.latency_reps"),
]


def _argv(args, files, out):
    subst = {"r": files, "out": out, "moe": files / "moe", "dense": files / "dense", "fx": FIXTURES}
    return [a.format(**subst) for a in args]


@pytest.mark.parametrize("args,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(_argv(args, files, out)) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("smoe-lab: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in cap.err + cap.out
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def test_there_are_at_least_thirty():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "name", ["pretrain-warmup", "reduce-calibration-truncated", "finetune-broken-config", "run-seeds-short"]
)
def test_the_real_entry_point_fails_the_same_way(files, tmp_path, name):
    args, message = next(c[1:] for c in CASES if c[0] == name)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(paths.PACKAGE_DIR.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "smoe_lab", *_argv(args, files, out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smoe-lab: error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and not out.exists()


def test_a_nan_loss_keeps_the_last_good_checkpoint(files, tmp_path, capsys):
    """NaN after a checkpoint: one error line, and the checkpoint of the last good step stays at --out."""
    out = tmp_path / "out"
    argv = ["pretrain", P, str(files / "ok.yaml"), "--set", "train.lr=1.0e+30", "--set", "train.max_steps=6"]
    assert main([*argv, "--set", "train.checkpoint_every=1", "--set", f"out_dir={out}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoe-lab: error: non-finite loss at step") and "\n" not in err
    good = checkpoint.read_config(out / "checkpoint")[1]["step"]
    assert good >= 1 and torch.isfinite(next(checkpoint.load(out / "checkpoint").parameters())).all()
