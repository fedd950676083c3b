#!/usr/bin/env bash
# Run every benchmark; each prints a table whose last line is the ratio to its reference.
#   bash bench/all.sh          small sizes on CPU (under ~10 minutes on 2 cores)
#   bash bench/all.sh --gpu    real-size models on a CUDA GPU
#   bash bench/all.sh --tiny   seconds: smoke test only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MODE=${1:-}
# The scripts import only `muse` (scaffolding from `muse.testing`): the repo root on PYTHONPATH
# is all they need when the package is not installed (`make install` installs it editable).
export NO_ALBUMENTATIONS_UPDATE=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "# $(date -u +%Y-%m-%dT%H:%MZ)  $(uname -m)  $(nproc) cores  mode=${MODE:-cpu}"
$PY -c "import torch; print('# torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu', torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
for script in download encode loader model; do
  echo; echo "## bench/$script.py $MODE"
  if [[ "$MODE" == "--gpu" && "$script" == "download" ]]; then
    $PY bench/$script.py            # downloading is CPU work: same sizes as the CPU run
  else
    $PY bench/$script.py $MODE
  fi
done
