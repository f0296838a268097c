"""smoe_lab.ds.jit: a build lock left by a killed JIT build must not hang the next DeepSpeed start for ever."""

import importlib
import os
import time

import pytest
from required import need_module

from smoe_lab.ds import jit


def _lock(root, op="deepspeed_shm_comm", age_s=0.0, sub="py311_cpu"):
    folder = root / sub / op if sub else root / op
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    t = time.time() - age_s
    os.utime(lock, (t, t))
    return lock


def test_stale_lock_is_removed_and_a_live_one_kept(tmp_path):
    stale = _lock(tmp_path, age_s=jit.STALE_LOCK_S + 60)
    live = _lock(tmp_path, op="other_op", age_s=5)
    flat = _lock(tmp_path, op="flat_op", age_s=jit.STALE_LOCK_S + 60, sub="")  # TORCH_EXTENSIONS_DIR/<op>/lock
    with pytest.warns(UserWarning, match="stale JIT build lock"):
        removed = jit.clear_stale_locks(tmp_path)
    assert sorted(removed) == sorted([stale, flat]) and not stale.exists() and not flat.exists() and live.exists()
    assert (stale.parent).is_dir()  # only the lock goes: the build folder (and a finished .so) stays


def test_a_torch_jit_build_waits_on_a_lock_and_goes_on_once_it_is_cleared(tmp_path, monkeypatch):
    """The mechanism behind the hang: torch's FileBaton waits while `lock` exists; clear_stale_locks ends the wait."""
    from torch.utils.file_baton import FileBaton

    lock = _lock(tmp_path, age_s=jit.STALE_LOCK_S + 1)
    assert not FileBaton(str(lock)).try_acquire()  # another (dead) build "holds" it: torch would wait() for ever
    with pytest.warns(UserWarning):
        jit.clear_stale_locks(tmp_path)
    baton = FileBaton(str(lock))
    assert baton.try_acquire()
    baton.release()


def test_each_environment_gets_its_own_build_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(jit.ENV, "")  # restored (or unset again) after the test: extensions_dir sets it
    monkeypatch.delenv(jit.ENV)
    assert jit.extensions_dir(tmp_path) == tmp_path / "torch_extensions"
    assert os.environ[jit.ENV] == str(tmp_path / "torch_extensions")  # children (ranks) inherit it
    monkeypatch.setenv(jit.ENV, str(tmp_path / "mine"))
    assert jit.extensions_dir(tmp_path) == tmp_path / "mine"  # the user's choice wins


def test_read_only_prefix_keeps_torch_default(tmp_path, monkeypatch):
    monkeypatch.setenv(jit.ENV, "")  # restored (or unset again) after the test: extensions_dir sets it
    monkeypatch.delenv(jit.ENV)
    monkeypatch.setattr(jit.os, "access", lambda path, mode: False)
    assert jit.extensions_dir(tmp_path) is None and jit.ENV not in os.environ


def test_ninja_of_the_venv_is_put_on_path(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ninja = bin_dir / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    jit.ensure_ninja_on_path(str(bin_dir / "python"))
    assert os.environ["PATH"].split(os.pathsep)[-1] == str(bin_dir)
    before = os.environ["PATH"]
    jit.ensure_ninja_on_path(str(bin_dir / "python"))  # found now: PATH unchanged
    assert os.environ["PATH"] == before


def test_skip_shm_allreduce_means_no_shm_op_is_built(monkeypatch):
    need_module("deepspeed", "deepspeed")
    import deepspeed
    import deepspeed.ops

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm.torch as an attribute is torch)

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, jit.SHM_OP, deepspeed.ops.__compatible_ops__.get(jit.SHM_OP))
    built = []
    monkeypatch.setattr(
        type(deepspeed.accelerator.get_accelerator()),
        "create_op_builder",
        lambda self, name: built.append(name) or _Builder(),
    )
    jit.skip_shm_allreduce()
    assert ds_torch.build_shm_op() is None and built == ["ShareMemCommBuilder"]  # asked for, never loaded


class _Builder:
    NAME = jit.SHM_OP

    def load(self):
        raise AssertionError("the shm op was loaded (built) although skip_shm_allreduce() was called")
