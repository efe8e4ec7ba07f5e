#!/usr/bin/env bash
# Stop one job's processes on this machine (FlagAI's local_stop_docker.sh, without `killall python`).
# usage: bash local_stop_docker.sh [<exp_name> [<exp_version>] | --job-id <id>]
# Default: the job most recently started from this directory (checkpoints_out/latest_job.txt).
# Only processes carrying that job's AQUILA_JOB_ID are signalled (SIGTERM, then SIGKILL after
# $AQUILA_STOP_TIMEOUT seconds, default 15).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch_common.sh
source "$SCRIPT_DIR/launch_common.sh"
find_python

if [[ "${1:-}" == --job-id ]]; then
  [[ $# -eq 2 ]] || die "usage: local_stop_docker.sh --job-id <id>"
  exec "$PY" -m aquila.launch stop --proj-home="$PWD" --job-id="$2"
fi
[[ $# -le 2 ]] || die "usage: local_stop_docker.sh [<exp_name> [<exp_version>] | --job-id <id>]"
exec "$PY" -m aquila.launch stop --proj-home="$PWD" ${1:+--exp="$1"} ${2:+--version="$2"}
