#!/usr/bin/env bash
# Stop one job's processes on this machine (FlagAI's local_stop_docker.sh, without `killall python`).
# usage: bash local_stop_docker.sh [<exp_name> [<exp_version>] | --job-id <id>]
# Default: the job most recently started from this directory (checkpoints_out/latest_job.txt).
# Only processes carrying that job's AQUILA_JOB_ID are signalled (SIGTERM, then SIGKILL after
# $AQUILA_STOP_TIMEOUT seconds, default 15).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "error: $(basename "$0"): $*" >&2; exit 2; }

# The Python environment: $AQUILA_PYTHON, else the active venv, the repo's .venv, python3 on PATH.
find_python() {
  local c d
  if [[ -n "${AQUILA_PYTHON:-}" ]]; then
    c="$AQUILA_PYTHON"
  else
    for c in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$SCRIPT_DIR/../../.venv/bin/python" "$(command -v python3 || true)"; do
      [[ -n "$c" && -x "$c" ]] && break
    done
  fi
  d="$(cd "$(dirname "$c")" 2>/dev/null && pwd)" && c="$d/$(basename "$c")"
  [[ -n "$c" && -f "$c" && -x "$c" ]] || die "no Python found (set AQUILA_PYTHON to the environment's python)"
  PY="$c"
  "$PY" -c 'import aquila.launch' 2>/dev/null || die "$PY cannot import aquila (pip install -e . there, or set AQUILA_PYTHON)"
}
find_python

if [[ "${1:-}" == --job-id ]]; then
  [[ $# -eq 2 ]] || die "usage: local_stop_docker.sh --job-id <id>"
  exec "$PY" -m aquila.launch stop --job-id "$2"
fi
[[ $# -le 2 ]] || die "usage: local_stop_docker.sh [<exp_name> [<exp_version>] | --job-id <id>]"
exec "$PY" -m aquila.launch stop --proj-home "$PWD" ${1:+--exp "$1"} ${2:+--version "$2"}
