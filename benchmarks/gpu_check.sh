#!/usr/bin/env bash
# GPU checks of thermokd's hot path, on one CUDA GPU (about 2 minutes on an H100; every part has a time limit, and a
# part that would start after 210 s is skipped, so a run ends within about 5 minutes even if parts hang):
#   1. the CUDA-marked tests (no host-device sync per step under torch.cuda.set_sync_debug_mode("error"),
#      fused = plain on the device, bf16 autocast) and the other tests that need CUDA;
#   2. steps/s of a ResNet student with thermokd's loss against a hand-written KD (target >= 0.97x);
#   3. the fused linear-layer loss's peak memory and time at 8x512 tokens, hidden 768, V=50304 (kd at the default
#      chunk and at 256; cist, with its weights and at its LM preset);
#   4. every method under bf16 autocast;
#   5. the loss's own time against a hand-written Hinton KD at [256, 100] and [4096, 32000] (loss_overhead.py),
#      also with masked rows weighted by zero (no sync) or gathered.
# Every part runs even if an earlier one fails; the failures are listed at the end and the exit status is 1.
# Usage: bash benchmarks/gpu_check.sh [python]
#   python: default .venv/bin/python if there is one, else python3. Without an installed thermokd the source tree
#   is used (PYTHONPATH=src), so a machine with torch (and pytest, numpy) but no virtual environment works.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if [ $# -ge 1 ]; then PY="$1"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY="$(command -v python3 || command -v python)"; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
FAILED=()
START=$SECONDS

BUDGET=210  # seconds: a part that would start later is skipped (and listed), so a run stays near 4 minutes

part() {  # part NAME LIMIT_SECONDS COMMAND...: run one part, note it if it fails or runs past its limit
  local name="$1" limit="$2"
  shift 2
  echo
  if [ $((SECONDS - START)) -gt $BUDGET ]; then
    echo "!!! $name: skipped, the run is past its ${BUDGET}s budget"
    FAILED+=("$name (skipped: out of time)")
    return
  fi
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    [ $rc -eq 124 ] && echo "!!! $name: stopped after ${limit}s"
    FAILED+=("$name (exit $rc)")
  fi
  echo "--- $name: exit $rc, $((SECONDS - t0)) s"
}

echo "python: $PY"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device (or no torch) for $PY: nothing to check"
  exit 1
fi
"$PY" -c "import torch, thermokd; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__,
'| thermokd from', thermokd.__file__)" || { echo "thermokd does not import"; exit 1; }
PYTEST=(-m pytest -q -p no:cacheprovider --tb=short -rfE)
if "$PY" -c "import pytest" 2>/dev/null; then
  part "cuda tests" 100 "$PY" "${PYTEST[@]}" tests/test_cuda.py
  part "other tests that need CUDA" 45 "$PY" "${PYTEST[@]}" -k "cuda or gpu" tests/test_temperatures.py tests/test_data.py \
    tests/test_normalisation.py tests/test_fast_path.py
else
  echo "!!! pytest is not installed for $PY: the tests were not run"
  FAILED+=("tests (no pytest)")
fi
part "step-rate" 75 "$PY" benchmarks/gpu_check.py step-rate --rounds 6 --steps 50
part "fused-memory" 45 "$PY" benchmarks/gpu_check.py fused-memory --rounds 5
part "fused-memory at chunk 256 (the previous default, to compare)" 45 "$PY" benchmarks/gpu_check.py fused-memory \
  --rounds 5 --chunk 256
part "fused-memory, cist (with its weights: two visits of the rows)" 45 "$PY" benchmarks/gpu_check.py fused-memory \
  --method cist --rounds 5
part "fused-memory, cist at its LM preset (w = 1: one visit)" 45 "$PY" benchmarks/gpu_check.py fused-memory \
  --method cist --domain lm --rounds 5
part "bf16" 30 "$PY" benchmarks/gpu_check.py bf16
part "loss-overhead" 60 "$PY" benchmarks/loss_overhead.py --device cuda --large --methods kd,kd-no-ignore,cist \
  --rounds 20 --block 20 --large-rounds 8
# rows that count nowhere (every eighth masked): weighted by zero without a sync (the default here) or gathered
part "loss-overhead, masked rows kept or gathered" 60 "$PY" benchmarks/loss_overhead.py --device cuda --large \
  --methods kd-masked-kept,kd-masked-gathered,cist-masked-kept,cist-masked-gathered --rounds 20 --block 20 \
  --large-rounds 8

echo
echo "=== gpu_check: $((SECONDS - START)) s in all ==="
if [ ${#FAILED[@]} -ne 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "every part passed"
