"""benchmarks/gpu.sh runs on a machine without CUDA: it skips cleanly, and its smoke mode runs every step."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_sh(tmp_path, **env):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "gpu")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_gpu_sh_skips_cleanly_without_cuda(tmp_path):
    out = _gpu_sh(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gpu.sh: skipped: no CUDA"
    assert not (tmp_path / "gpu" / "gpu_bench.md").exists()


@pytest.mark.slow
def test_gpu_sh_smoke_mode_runs_every_step_on_cpu(tmp_path):
    out = _gpu_sh(tmp_path, GPU_SH_SMOKE="1")
    assert out.returncode == 0, out.stderr
    report = (tmp_path / "gpu" / "gpu_bench.md").read_text()
    assert "FAILED" not in report, report
    for section in ("## Host syncs", "## MoE layer", "## 354M training step"):
        assert section in report
    assert report.count("no host sync") >= 4  # padded and grouped_mm at two expert counts
    assert "grouped_mm ms" in report and "fastest native expert path" in report
    assert "tokens/s" in report and "peak MB" in report


def test_bench_moe_quick_table_has_spreads(capsys):
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_moe

    bench_moe.main(["--tokens", "256", "--experts", "4", "--d-model", "32", "--d-ff", "64", "--rounds", "2",
                    "--reps", "1", "--impls", "ideal", "native", "padded"])  # fmt: skip
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| tokens"))
    assert "native/ideal" in header and "padded/ideal" in header
    row = next(line for line in out.splitlines() if line.startswith("|") and "256" in line)
    assert row.count("(") >= 5  # every cell is "median (min-max)"


def test_bench_moe_routing_table_compares_with_the_reference(capsys):
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_moe

    bench_moe.main(["--routing", "--tokens", "128", "--experts", "4", "32", "--d-model", "16", "--rounds", "2",
                    "--reps", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "top1_route/reference" in out
    rows = [line for line in out.splitlines() if line.startswith("|") and "128" in line]
    assert len(rows) == 2 and all(row.count("(") == 3 for row in rows)
