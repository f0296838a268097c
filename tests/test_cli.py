"""The command line: one error line for bad input, nothing written; calibrate -> reduce end to end."""

import json

import pytest

from smoe_lab import checkpoint
from smoe_lab.calibrate import Calibration
from smoe_lab.cli import main
from smoe_lab.config import ModelConfig
from smoe_lab.data.corpus import prepare
from smoe_lab.model import GPT


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    corpus = prepare("tiny")
    from smoe_lab.data.corpus import open_corpus

    cfg = ModelConfig.preset("tiny", n_layer=4, d_model=32, n_head=2, d_ff=64, num_experts=8)
    path = tmp_path_factory.mktemp("ck") / "checkpoint"
    checkpoint.save(GPT(cfg, seed=0), path, tokenizer=open_corpus(corpus).tokenizer, corpus=str(corpus))
    return path


def _corpus_calibration(ckpt, out, split="val_wiki", max_tokens="2048"):
    argv = [
        "calibrate",
        "--checkpoint",
        str(ckpt),
        "--corpus",
        "tiny",
        "--split",
        split,
        "--max-tokens",
        max_tokens,
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    return out


def test_calibrate_then_reduce(moe_ckpt, tmp_path, capsys):
    cal = tmp_path / "cal.safetensors"
    argv = ["calibrate", "--checkpoint", str(moe_ckpt), "--task", "boolq", "--max-examples", "8", "--batch-size", "4"]
    assert main([*argv, "--out", str(cal), "--no-progress"]) == 0
    assert Calibration.load(cal).manifest["task"] == "boolq"
    argv = ["reduce", "--checkpoint", str(moe_ckpt), "--calibration", str(cal), "--method", "uncurl"]
    assert main([*argv, "--experts", "[4, 2]", "--out", str(tmp_path / "red")]) == 0
    red = checkpoint.load(tmp_path / "red")
    assert [m.num_experts for m in red.moe_layers()] == [4, 2]
    report = json.loads((tmp_path / "red.report.json").read_text())
    assert report["method"] == "uncurl" and report["num_experts"] == [4, 2]
    assert checkpoint.load_tokenizer(tmp_path / "red").vocab_size == 4096


def test_corpus_calibration(moe_ckpt, tmp_path):
    cal = _corpus_calibration(moe_ckpt, tmp_path / "cal.safetensors", "val_news", "4096")
    assert Calibration.load(cal).manifest["tokens"] > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--experts", "9"], "must be in [1, Z=8], got 9"),
        (["--experts", "0"], "must be in [1, Z=8], got 0"),
        (["--method", "prune"], "unknown reduction method 'prune'"),
    ],
)
def test_reduce_errors_are_one_line_and_write_nothing(moe_ckpt, tmp_path, capsys, args, message):
    cal = _corpus_calibration(moe_ckpt, tmp_path / "cal.safetensors")
    base = {"--method": "uncurl", "--experts": "4"}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["reduce", "--checkpoint", str(moe_ckpt), "--calibration", str(cal), "--out", str(tmp_path / "out")]
    argv += [x for kv in base.items() for x in kv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoe-lab: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_calibration_from_another_checkpoint_is_rejected(moe_ckpt, tmp_path, capsys):
    other = tmp_path / "other"
    checkpoint.save(GPT(checkpoint.read_config(moe_ckpt)[0], seed=1), other)
    cal = _corpus_calibration(moe_ckpt, tmp_path / "cal.safetensors")
    capsys.readouterr()
    argv = [
        "reduce",
        "--checkpoint",
        str(other),
        "--calibration",
        str(cal),
        "--method",
        "uncurl",
        "--experts",
        "4",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    assert "another checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_files_and_bad_params(tmp_path, capsys):
    assert (
        main(
            [
                "reduce",
                "--checkpoint",
                str(tmp_path / "nope"),
                "--calibration",
                str(tmp_path / "c"),
                "--method",
                "uncurl",
                "--experts",
                "2",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "calibration artifact not found" in capsys.readouterr().err
    assert main(["pretrain", "--set", "train.lr=-1", "--set", f"out_dir={tmp_path}/p"]) == 2
    assert "TrainConfig.lr" in capsys.readouterr().err
    assert main(["pretrain", "--set", "num_experts=0", "--set", f"out_dir={tmp_path}/p"]) == 2
    assert "ModelConfig.num_experts" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
