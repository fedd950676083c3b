#!/usr/bin/env bash
# One command that proves a GPU machine (issue 25): prints one table; record it in bench/RESULTS.md
# with the GPU's name. Whenever a GPU is at hand, this runs first.
#   bash bench/gpu_check.sh          real sizes on CUDA (<= ~8 minutes on an H100/A100)
#   bash bench/gpu_check.sh --tiny   tiny sizes on CPU (seconds; the suite runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export NO_ALBUMENTATIONS_UPDATE=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "# $(date -u +%Y-%m-%dT%H:%MZ)  $(uname -m)  $(nproc) cores  $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec $PY bench/gpu_check.py "$@"
