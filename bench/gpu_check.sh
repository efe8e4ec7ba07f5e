#!/usr/bin/env bash
# Training GPU check (one CUDA machine, e.g. an H200; no network): versions, flash-attn, attention path, a bf16
# training step of aquila-1b with tokens/s and MFU, and a BMTrain step if bmtrain imports. Under ~5 minutes.
#   bash bench/gpu_check.sh [extra flags for bench/gpu_check.py]
# Optional wheels in .whl/ (flash-attn, bmtrain, ...) are installed offline first; torch wheels are never touched.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${AQUILA_PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY="$(command -v python3 || command -v python)"; fi
fi
echo "python: $PY"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: absent"

if [[ -d .whl ]]; then
  for whl in .whl/*.whl; do
    [[ -e "$whl" ]] || continue
    case "$(basename "$whl")" in
      torch-*|torchvision-*|torchaudio-*|nvidia_*) echo "skipping $whl (torch and its CUDA libraries stay as installed)"; continue ;;
    esac
    "$PY" -m pip install --no-index --no-deps --find-links .whl "$whl" >/dev/null 2>&1 \
      && echo "installed $(basename "$whl")" || echo "could not install $(basename "$whl") (continuing)"
  done
fi

timeout 290 "$PY" bench/gpu_check.py "$@"
rc=$?
if [[ $rc -eq 124 ]]; then echo "gpu_check.py ran past 290 s and was stopped"; fi
exit $rc
