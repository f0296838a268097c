"""Kill -9 and resume: a pretraining and a finetuning subprocess are killed between steps, after a checkpoint's
files were written, and while an old checkpoint was moved aside for a new one; each resume (`--resume`) finishes
with weights bit-equal to an uninterrupted run on CPU. Kills come from the SMOE_LAB_KILL_AT hook (smoe_lab.faults).

The subprocesses are forked children running `smoe_lab.cli.main` (they inherit the imported torch, so each costs
its few training steps instead of a fresh interpreter's imports); SIGKILL ends them as it would any process.
"""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401 - AdamW imports it on first use (seconds): once here, not in every child

import smoe_lab.cli  # noqa: F401 - imported before forking, shared by every child
import smoe_lab.finetune  # noqa: F401
from smoe_lab import checkpoint, faults
from smoe_lab.config import ModelConfig
from smoe_lab.data.corpus import open_corpus, prepare
from smoe_lab.model import GPT
from smoe_lab.train import read_metrics

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"
# Each kill leaves a different state behind: between steps (last save complete), after the new checkpoint's
# files were written (a temp folder left), after the old checkpoint was moved aside (nothing at the path).
KILLS = ["step:3", "save-swapped:2", "save-written:1"]


class Done:
    def __init__(self, status: int, log: str):
        self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        self.stderr = log


def smoe_lab(*args: str, kill: str | None = None) -> Done:
    """`smoe-lab ARGS --no-progress` in a forked child process (SMOE_LAB_KILL_AT=kill there); waits for it."""
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"smoe-lab-child-{os.getpid()}.log"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.pop(faults.ENV, None)
            if kill:
                os.environ[faults.ENV] = kill
            faults._counts.clear()
            from smoe_lab.cli import main

            code = main([*args, "--no-progress"])
        except BaseException:  # noqa: BLE001 - report anything, then leave
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    text = log.read_text() if log.exists() else ""
    log.unlink(missing_ok=True)
    return Done(status, text)


def same_weights(a: Path, b: Path) -> None:
    sa, sb = checkpoint.load(a).state_dict(), checkpoint.load(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def run_with_kills(args: list[str], out: Path) -> list[str]:
    """Run `args` killed at each point of KILLS in turn (each run resuming the last), then to the end; returns
    what each kill left at out/checkpoint."""
    left = []
    for i, point in enumerate(KILLS):
        proc = smoe_lab(*args, *(["--resume"] if i else []), kill=point)
        assert proc.returncode == -signal.SIGKILL, f"{point}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
        ck = out / "checkpoint"
        old = out / ".checkpoint.old"
        tmp = [p.name for p in out.iterdir() if p.name.startswith(".checkpoint.tmp-")]
        left.append("moved aside" if not ck.exists() and old.is_dir() else ("temp left" if tmp else "complete"))
    proc = smoe_lab(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return left


def test_pretraining_killed_three_ways_resumes_bit_exact(tmp_path):
    params = tmp_path / "p.yaml"
    train = "{max_steps: 6, batch_size: 4, micro_batch_size: 2, lr: 1.0e-3, warmup_steps: 2, eval_every: 3, "
    train += "eval_batches: 1, checkpoint_every: 1, log_every: 1, device: cpu}"
    params.write_text(
        "preset: tiny\nmodel: {n_layer: 2, d_model: 32, n_head: 2, d_ff: 64}\nnum_experts: 4\ncorpus: tiny\n"
        f"train: {train}\n"
    )
    prepare("tiny")
    full, split = tmp_path / "full", tmp_path / "split"
    proc = smoe_lab("pretrain", "--params", str(params), "--set", f"out_dir={full}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    left = run_with_kills(["pretrain", "--params", str(params), "--set", f"out_dir={split}"], split)
    assert left == ["complete", "moved aside", "temp left"]
    same_weights(full / "checkpoint", split / "checkpoint")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(full / "metrics.jsonl")) == strip(read_metrics(split / "metrics.jsonl"))
    assert sorted(p.name for p in split.iterdir()) == ["checkpoint", "metrics.jsonl", "run.json"]


@pytest.fixture
def base_ckpt(tmp_path):
    corpus = open_corpus(prepare("tiny"))
    cfg = ModelConfig.preset("tiny", n_layer=2, d_model=32, n_head=2, d_ff=64, num_experts=4, block_size=64)
    return checkpoint.save(GPT(cfg, seed=0), tmp_path / "base", tokenizer=corpus.tokenizer, base_model="tiny")


def test_finetuning_killed_three_ways_resumes_bit_exact(tmp_path, base_ckpt):
    sets = ["steps=6", "batch_size=2", "micro_batch_size=1", "lr=1e-3", "warmup_steps=2", "device=cpu"]
    sets += ["eval_every=2", "checkpoint_every=1", "log_every=1", "dev_fraction=0.34"]
    args = ["finetune", "--checkpoint", str(base_ckpt), "--task", "rte", "--root", str(FIXTURES)]
    args += [x for s in sets for x in ("--set", s)]
    full, split = tmp_path / "full", tmp_path / "split"
    proc = smoe_lab(*args, "--out", str(full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    left = run_with_kills([*args, "--out", str(split)], split)
    assert "moved aside" in left or "temp left" in left
    same_weights(full / "checkpoint", split / "checkpoint")
    same_weights(full / "best", split / "best")
    a, b = (json.loads((d / "finetune.json").read_text()) for d in (full, split))
    for k in ("accuracy", "acc_norm", "loss", "dev_accuracy", "dev_loss", "best_step", "final_train_loss"):
        assert a[k] == b[k], k
