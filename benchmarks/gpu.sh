#!/usr/bin/env bash
# Every GPU benchmark of smoe_lab in one run (about 5 minutes on one H100/H200; each step has a time limit so the
# whole stays under 8 minutes), written as one Markdown report:
#   1. host syncs of the MoE training step per expert path (torch.cuda.set_sync_debug_mode)
#   2. the MoE layer at 8-128 experts, bf16: padded baddbmm vs torch._grouped_mm vs the host-read grouped loop vs
#      DeepSpeed-MoE, against dense and the ideal stacked layer (benchmarks/bench_moe.py)
#   3. a training step of the 354M model, dense and 8 experts, bf16: tokens/s and peak memory (bench_train.py)
# The fastest native path per expert count is printed at the end of step 2: set it as
# smoe_lab/moe_experts.py CUDA_DEFAULT_PATH (or export SMOE_LAB_MOE_PATH) when it is not "padded".
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default runs/gpu; the report is OUT_DIR/gpu_bench.md
#   GPU_SH_SMOKE=1 bash benchmarks/gpu.sh   # tiny sizes on CPU, no DeepSpeed: checks that every step runs (CI)
# Without CUDA (and without GPU_SH_SMOKE) it prints one "skipped: no CUDA" line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
REPORT="$OUT/gpu_bench.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

cuda=0
"$PY" -c "
import sys
try:
    import torch
except ImportError:
    sys.exit(3)
sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || cuda=$?
if [ "$cuda" -ne 0 ] && [ "$cuda" -ne 1 ]; then
  echo "gpu.sh: error: torch is not importable with $PY (set PYTHON=/path/to/python)" >&2
  exit 2
fi
if [ -n "${GPU_SH_SMOKE:-}" ]; then
  SYNC_ARGS="--quick --device cpu"
  MOE_ARGS="--device cpu --tokens 512 --experts 4 8 --d-model 64 --d-ff 256 --rounds 1 --reps 1 --impls dense ideal padded grouped_mm grouped"
  TRAIN_ARGS="--device cpu --preset tiny --variants 1 4 --batch-size 2 --block-size 32 --rounds 1 --reps 1 --bf16"
elif [ "$cuda" -ne 0 ]; then
  echo "gpu.sh: skipped: no CUDA device (torch.cuda.is_available() is False); nothing written" >&2
  echo "gpu.sh: skipped: no CUDA"
  exit 0
else
  SYNC_ARGS=""
  MOE_ARGS="--bf16 --tokens 16384 --experts 8 32 64 128 --d-model 1024 --d-ff 4096 --rounds 5 --reps 5 --impls dense ideal padded grouped_mm grouped deepspeed"
  TRAIN_ARGS="--preset gpt2-354m --variants 1 8 --batch-size 8 --block-size 1024 --rounds 3 --reps 3 --bf16"
fi

run() {  # run LIMIT_SECONDS TITLE COMMAND...: one section of the report; a step that fails or runs over is reported
  local limit=$1 title=$2
  shift 2
  echo "## $title"
  echo
  echo "\`$*\`"
  echo
  local rc=0
  timeout "$limit" "$@" 2>"$OUT/stderr.txt" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "FAILED (exit $rc; 124 = over its ${limit} s limit); last lines of stderr:"
    tail -n 5 "$OUT/stderr.txt" | sed 's/^/    /'
  fi
  echo
}

{
  echo "# smoe_lab GPU benchmarks"
  echo
  "$PY" -c "import torch; d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (smoke run)'; print(f'device: {d}; torch {torch.__version__}')"
  date -u +"date: %Y-%m-%d %H:%M UTC"
  echo
  run 90 "Host syncs of the MoE training step" "$PY" benchmarks/check_sync.py $SYNC_ARGS
  run 240 "MoE layer, forward + backward" "$PY" benchmarks/bench_moe.py $MOE_ARGS
  run 150 "354M training step (dense vs 8 experts)" "$PY" benchmarks/bench_train.py $TRAIN_ARGS
} | tee "$REPORT"
echo "gpu.sh: report written to $REPORT"
