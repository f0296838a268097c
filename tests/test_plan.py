"""The sample plan of a built corpus: mapping, rank slices, resume by consumed samples, both training engines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from smoe_lab import checkpoint, paths
from smoe_lab.config import ModelConfig, TrainConfig
from smoe_lab.data.build import build
from smoe_lab.data.corpus import open_corpus
from smoe_lab.data.plan import PlanLoader, SamplePlan, interleave, permute, quotas
from smoe_lab.train import pretrain, read_metrics, resolve_corpus
from tests.build_inputs import write_mix

T = 32


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    write_mix(root / "in")
    sources = {"c4": [str(root / "in" / "c4" / "*.json.gz")], "cc100": [str(root / "in" / "cc100" / "en.txt.xz")]}
    build(root / "corpus", sources, tokens=40_000, val_tokens=2000, shard_tokens=3000, workers=1, progress=False)
    return root / "corpus"


@pytest.fixture(scope="module")
def plan(corpus_dir):
    return SamplePlan.from_corpus(open_corpus(corpus_dir), T, seed=0)


def test_permute_is_a_seeded_bijection():
    for n in (1, 2, 3, 17, 1000, 4097):
        p = permute(np.arange(n), n, key=12345)
        assert sorted(p.tolist()) == list(range(n))
    a, b = permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2)
    assert (a != b).mean() > 0.9 and (a != np.arange(1000)).mean() > 0.9  # other key, other order; not identity
    np.testing.assert_array_equal(permute(np.array([5, 700]), 1000, 1), a[[5, 700]])  # random access


def test_interleave_holds_every_prefix_within_one_sample_of_the_weights():
    for w in ([0.25, 0.75], [1, 1, 2], [0.001, 0.999]):
        q = quotas(w, cycle=4096)
        assert q.sum() == 4096 and (q >= 1).all()
        src, rank = interleave(q)
        counts = np.stack([np.cumsum(src == s) for s in range(len(q))], axis=1)  # [C, S]
        ideal = np.arange(1, 4097)[:, None] * (q / q.sum())[None, :]
        assert np.abs(counts - ideal).max() <= 1.0
        for s in range(len(q)):  # ranks count each source's slots 0, 1, 2, ...
            np.testing.assert_array_equal(rank[src == s], np.arange(q[s]))


def test_every_window_lies_inside_its_shard_and_an_epoch_sees_each_once(plan, corpus_dir):
    n = int(plan.total_windows.sum())
    src, shard, offset = plan.locate(np.arange(4 * n))
    for s in range(len(plan.sources)):
        used = np.asarray(plan.sources[s].used)
        sel = src == s
        assert (offset[sel] + T + 1 <= used[shard[sel]]).all() and (offset[sel] % T == 0).all()
        k = plan.source_of(np.arange(4 * n))[1][sel]
        first_epoch = k < plan.total_windows[s]
        ids = set(zip(shard[sel][first_epoch].tolist(), offset[sel][first_epoch].tolist()))
        assert len(ids) == first_epoch.sum() == plan.total_windows[s]  # each window once per epoch
    x, y = plan.batch(np.arange(6))
    assert x.shape == y.shape == (6, T) and torch.equal(x[:, 1:], y[:, :-1])
    again = SamplePlan.from_corpus(open_corpus(corpus_dir), T, seed=0)
    assert torch.equal(again.batch(np.arange(6))[0], x)  # a pure function of (corpus, seed, T)
    other = SamplePlan.from_corpus(open_corpus(corpus_dir), T, seed=1)
    assert not torch.equal(other.batch(np.arange(6))[0], x)


def _global_batches(loader_factory, world: int, micro: int, batch: int, steps: int):
    """Run `world` rank loaders through `steps` optimizer steps; returns per step the list of samples read."""
    loaders = [loader_factory(rank, world) for rank in range(world)]
    out = []
    for _ in range(steps):
        rows, idx = [], []
        for _ in range(batch // (micro * world)):
            for ld in loaders:
                idx.append(ld.indices())
                rows.append(ld.next_batch()[0])
        out.append((np.concatenate(idx), torch.cat(rows)))
    return out, loaders


def test_two_ranks_get_disjoint_samples_that_make_the_global_batch(plan):
    B, b = 8, 2
    one, _ = _global_batches(lambda r, w: PlanLoader(plan, b, r, w), 1, b, B, 3)
    two, _ = _global_batches(lambda r, w: PlanLoader(plan, b, r, w), 2, b, B, 3)
    for t, ((i1, x1), (i2, x2)) in enumerate(zip(one, two)):
        assert len(set(i2.tolist())) == B and set(i2.tolist()) == set(range(t * B, (t + 1) * B)) == set(i1.tolist())
        order = np.argsort(i2)
        assert torch.equal(x2[torch.from_numpy(order)], x1)  # the same samples, whichever rank read them
    r0 = PlanLoader(plan, b, 0, 2).indices()
    r1 = PlanLoader(plan, b, 1, 2).indices()
    assert not set(r0.tolist()) & set(r1.tolist())


def test_resume_at_a_consumed_count_gives_the_next_batches(plan, corpus_dir):
    B, b = 8, 2
    full, _ = _global_batches(lambda r, w: PlanLoader(plan, b, r, w), 2, b, B, 5)
    first, loaders = _global_batches(lambda r, w: PlanLoader(plan, b, r, w), 2, b, B, 2)
    state = loaders[0].state_dict()
    assert state["consumed_samples"] == 2 * B and all(ld.state_dict() == state for ld in loaders)

    def resumed(rank, world):
        ld = PlanLoader(plan, b, rank, world)
        ld.load_state_dict(state)
        return ld

    for world in (2, 1, 4):  # the same next batches on 2 ranks, and on 1 or 4 ranks at the same global batch
        rest, _ = _global_batches(resumed, world, b, B, 3)
        for (i_full, x_full), (i_rest, x_rest) in zip(full[2:], rest):
            assert sorted(i_rest.tolist()) == sorted(i_full.tolist())
            assert torch.equal(
                x_rest[torch.from_numpy(np.argsort(i_rest))], x_full[torch.from_numpy(np.argsort(i_full))]
            )
    other = SamplePlan.from_corpus(open_corpus(corpus_dir), T, seed=5)
    with pytest.raises(ValueError, match="sample plan"):
        PlanLoader(other, b).load_state_dict(state)
    with pytest.raises(ValueError, match="not a multiple"):
        PlanLoader(plan, 3).load_state_dict(state)
    with pytest.raises(ValueError, match="no sample-plan state"):
        PlanLoader(plan, b).load_state_dict(None)  # a checkpoint trained on a recipe corpus


def test_built_corpus_resolves_by_folder_and_by_name(corpus_dir, tmp_path, monkeypatch):
    assert resolve_corpus(str(corpus_dir)).is_sharded
    monkeypatch.setenv("SMOE_LAB_DATA", str(tmp_path))
    shutil.copytree(corpus_dir, paths.prepared_dir() / "mix-40k")
    c = resolve_corpus("mix-40k")  # `corpus: mix-40k` in params, like a recipe name
    assert c.path == paths.prepared_dir() / "mix-40k" and open_corpus("mix-40k").path == c.path


def _tiny_gpt2(**kw) -> ModelConfig:
    return ModelConfig.preset("tiny", n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=50257, block_size=T, **kw)


def test_pretrain_on_a_built_corpus_resumes_exactly(corpus_dir, tmp_path, monkeypatch):
    mcfg = _tiny_gpt2(num_experts=2)
    tcfg = TrainConfig(
        max_steps=4,
        batch_size=4,
        micro_batch_size=2,
        lr=3e-3,
        warmup_steps=1,
        eval_every=2,
        eval_batches=1,
        checkpoint_every=2,
        log_every=1,
    )
    full = pretrain(mcfg, tcfg, corpus_dir, tmp_path / "full", progress=False)
    state = checkpoint.load_train_state(tmp_path / "full" / "checkpoint")
    assert state["data"]["consumed_samples"] == 4 * 4

    import smoe_lab.train as train_mod

    real_fit = train_mod.fit

    class Crash(Exception):
        pass

    def crashing_fit(*a, **k):
        def boom(step, row):
            if step == 4:  # fit evaluates before it checkpoints: the last checkpoint is step 2's
                raise Crash

        return real_fit(*a, **k, on_eval=boom)

    monkeypatch.setattr(train_mod, "fit", crashing_fit)
    with pytest.raises(Crash):
        pretrain(mcfg, tcfg, corpus_dir, tmp_path / "split", progress=False)
    monkeypatch.setattr(train_mod, "fit", real_fit)
    assert checkpoint.load_train_state(tmp_path / "split" / "checkpoint")["data"]["consumed_samples"] == 2 * 4
    pretrain(mcfg, tcfg, corpus_dir, tmp_path / "split", resume=True, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(full.metrics)) == strip(read_metrics(tmp_path / "split" / "metrics.jsonl"))
    a, b = checkpoint.load(tmp_path / "full" / "checkpoint"), checkpoint.load(tmp_path / "split" / "checkpoint")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


@pytest.mark.slow
def test_paper_deepspeed_smoke_on_two_gloo_ranks(corpus_dir, tmp_path):
    """params/01_pretrain/paper_deepspeed_smoke.yaml as the README runs it: torchrun, 2 ranks, ZeRO-2, 3 steps."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "smoke"
    params = paths.params_dir() / "01_pretrain" / "paper_deepspeed_smoke.yaml"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "smoe_lab",
        "pretrain",
        "--params",
        str(params),
        "--set",
        f"corpus={corpus_dir}",
        "--set",
        f"out_dir={out}",
        "--no-progress",
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in train)
    assert train[0]["loss"] > 9.0  # ~ln(50257) = 10.8 at init: the real GPT-2 vocabulary
    assert train[-1]["tokens"] == 3 * 2 * 32 and [r for r in rows if r["kind"] == "eval"]
    cfg, meta = checkpoint.read_config(out / "checkpoint")
    assert (cfg.n_layer, cfg.d_model, cfg.d_ff, cfg.vocab_size) == (2, 1024, 4096, 50257)
    assert meta["train_engine"] == {
        "engine": "deepspeed",
        "world_size": 2,
        "zero_stage": 2,
        "moe_impl": "deepspeed",
        "ep_size": 2,
    }
    state = checkpoint.load_train_state(out / "checkpoint")
    assert state["data"]["consumed_samples"] == 3 * 2  # 3 steps x global batch 2
    assert json.loads((out / "run.json").read_text())["corpus"] == str(corpus_dir)
