#!/usr/bin/env bash
# Every CUDA check of issue 15 in one call on the GPU machine (one H200, no network), under ~8 minutes:
#   bash bench/gpu_check.sh [flags for bench/gpu_check.py, e.g. --parts decode]
# It installs the project with `pip install --no-deps -e .` over the machine's own Python (torch, transformers,
# tokenizers, safetensors, sentencepiece, numpy, pyyaml and pytest are there) and never installs torch. A package
# that is missing there travels as a wheel in .whl/ (gitignored; name `.whl` in the device tool's carry): those are
# installed offline into /tmp/site first, torch and its CUDA libraries excepted. The table is printed at the end
# and, where $OUT is set, written to $OUT/gpu_check.md (part logs: $OUT/gpu_check.log).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1

PY="${AQUILA_PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY="$(command -v python3 || command -v python)"; fi
fi
echo "python: $PY"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  || echo "nvidia-smi: absent"

wheels=()
for whl in .whl/*.whl; do
  [[ -e "$whl" ]] || continue
  case "$(basename "$whl")" in
    torch-*|torchvision-*|torchaudio-*|triton-*|nvidia_*) echo "not installing $whl (torch and its CUDA libraries stay)" ;;
    *) wheels+=("$whl") ;;
  esac
done
if ((${#wheels[@]})); then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed from .whl/: ${wheels[*]}"
  else
    echo "could not install the wheels in .whl/ (continuing without them)"
  fi
fi

# The project itself: editable, offline, no dependencies; the checks also find it through PYTHONPATH if this fails.
if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/aquila-pip.log 2>&1; then
  echo "installed aquila (editable)"
else
  echo "pip install -e . failed (using PYTHONPATH=$PWD): $(tail -n 1 /tmp/aquila-pip.log)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# gpu_check.py keeps its parts within --total-s (480 s by default); this outer limit only catches a hang of its own.
timeout 575 "$PY" bench/gpu_check.py "$@"
rc=$?
[[ $rc -eq 124 ]] && echo "bench/gpu_check.py ran past 575 s and was stopped"
exit $rc
