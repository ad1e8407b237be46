#!/usr/bin/env bash
# GPU checks of thermokd's hot path, on one CUDA GPU (about 5 minutes on an H100):
#   1. the CUDA-marked tests (no host-device sync per step under torch.cuda.set_sync_debug_mode("error"),
#      fused = plain on the device, bf16 autocast) and the other tests that need CUDA;
#   2. steps/s of a ResNet student with thermokd's loss against a hand-written KD (target >= 0.97x);
#   3. the fused linear-layer loss's peak memory and time at 8x512 tokens, hidden 768, V=50304;
#   4. every method under bf16 autocast.
# Usage: bash benchmarks/gpu_check.sh [python]   (default: .venv/bin/python, else python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
"$PY" -m pytest -q -p no:cacheprovider -m cuda tests/
"$PY" -m pytest -q -p no:cacheprovider -k cuda tests/test_temperatures.py tests/test_data.py
"$PY" benchmarks/gpu_check.py step-rate --rounds 6 --steps 50
"$PY" benchmarks/gpu_check.py fused-memory --rounds 5
"$PY" benchmarks/gpu_check.py bf16
