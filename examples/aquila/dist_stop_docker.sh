#!/usr/bin/env bash
# Stop one job on every node of a hostfile (FlagAI's dist_stop_docker.sh, without `killall python`).
# usage: bash dist_stop_docker.sh <hostfile> [<exp_name> [<exp_version>] | --job-id <id>]
# Default: the job most recently started from this directory. Local addresses are handled here (once),
# the others over $AQUILA_SSH (default "ssh -o BatchMode=yes -o ConnectTimeout=10") running local_stop_docker.sh there.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJ_HOME="$PWD"
# shellcheck source=launch_common.sh
source "$SCRIPT_DIR/launch_common.sh"
find_python

[[ $# -ge 1 && $# -le 3 ]] || die "usage: dist_stop_docker.sh <hostfile> [<exp_name> [<exp_version>] | --job-id <id>]"
HOSTFILE="$1"
shift
if [[ "${1:-}" == --job-id ]]; then
  [[ $# -eq 2 ]] || die "usage: dist_stop_docker.sh <hostfile> --job-id <id>"
  JOB_ID="$2"
else
  job="$("$PY" -m aquila.launch job --proj-home="$PROJ_HOME" ${1:+--exp="$1"} ${2:+--version="$2"})" || exit 2
  eval "$job"
fi
hosts="$("$PY" -m aquila.launch hosts --hostfile="$HOSTFILE")" || exit 2
eval "$hosts"  # NODE_ADDRS NODE_LOCAL
read -r -a SSH <<<"${AQUILA_SSH:-ssh -o BatchMode=yes -o ConnectTimeout=10}"

# All nodes at once: a trainer that got SIGTERM stops at a step boundary agreed with the other nodes' ranks, so
# one node's stop must not wait for the next node to be told.
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
started=()
done_local=0
for i in "${!NODE_ADDRS[@]}"; do
  if [[ "${NODE_LOCAL[$i]}" == 1 ]]; then
    [[ "$done_local" == 1 ]] && continue
    done_local=1
    "$PY" -m aquila.launch stop --proj-home="$PROJ_HOME" --job-id="$JOB_ID" >"$out/$i.out" 2>"$out/$i.err" &
  else
    remote="cd $(printf '%q' "$PROJ_HOME") && AQUILA_PYTHON=$(printf '%q' "$PY") \
      AQUILA_STOP_TIMEOUT=$(printf '%q' "${AQUILA_STOP_TIMEOUT:-15}") bash $(printf '%q' "$SCRIPT_DIR/local_stop_docker.sh") --job-id $(printf '%q' "$JOB_ID")"
    { "${SSH[@]}" "${NODE_ADDRS[$i]}" "$remote" </dev/null || { echo "error: could not reach ${NODE_ADDRS[$i]}" >&2; exit 1; }; } \
      >"$out/$i.out" 2>"$out/$i.err" &
  fi
  started+=("$i:$!")
done
rc=0
for entry in "${started[@]}"; do
  i="${entry%%:*}"
  wait "${entry#*:}" || rc=1
  cat "$out/$i.out"
  cat "$out/$i.err" >&2
done
exit "$rc"
