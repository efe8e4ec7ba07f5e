#!/usr/bin/env bash
# Start a training job on every node of a hostfile (FlagAI's dist_trigger_docker.sh).
# usage: bash dist_trigger_docker.sh [--follow] <hostfile> <config.yaml> <model_name> <exp_name>
# Run it from examples/aquila: PROJ_HOME is the current directory and must be the same path on every node.
# Each node gets its rank explicitly (hostfile line order); local addresses start directly, others over
# $AQUILA_SSH (default "ssh -o BatchMode=yes -o ConnectTimeout=10"). Returns at once; --follow (or AQUILA_FOLLOW=1) streams the
# master's log and exits with the job's status. Stop with dist_stop_docker.sh <hostfile>. See docs/launching.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJ_HOME="$PWD"
ME="$(basename "$0")"
# shellcheck source=launch_common.sh
source "$SCRIPT_DIR/launch_common.sh"

FOLLOW="${AQUILA_FOLLOW:-0}"
args=()
for a in "$@"; do
  if [[ "$a" == --follow ]]; then FOLLOW=1; else args+=("$a"); fi
done
[[ ${#args[@]} -eq 4 ]] || die "usage: $ME [--follow] <hostfile> <config.yaml> <model_name> <exp_name>"
HOSTFILE="$(abspath "${args[0]}")"
CONFIG="$(abspath "${args[1]}")"
MODEL_NAME="${args[2]}"
EXP_NAME="${args[3]}"
read -r -a SSH <<<"${AQUILA_SSH:-ssh -o BatchMode=yes -o ConnectTimeout=10}"

find_python
EXP_VERSION="$(date +%Y%m%d%H)"
# Validate everything before starting anything: the hostfile, names, the YAML with the trainer's own parser and
# the model, tokenizer and data it names. Sets NODES_NUM NODE_ADDRS NODE_SLOTS NODE_LOCAL MASTER_ADDR MASTER_PORT
# SCRIPT_FILE PORT_LOCK (and checks the master port is free when the master is this machine).
plan="$("$PY" -m aquila.launch trigger-plan --hostfile="$HOSTFILE" --config="$CONFIG" --model="$MODEL_NAME" \
  --exp="$EXP_NAME" --version="$EXP_VERSION" --proj-home="$PROJ_HOME" --script-dir="$SCRIPT_DIR" \
  ${AQUILA_LOCAL_ONLY:+--single-node})" || exit 2
eval "$plan"

# Before anything starts: every remote node answers over ssh, has the project and the Python environment at
# the same paths, and holds its hostfile address on one of its interfaces.
check_remote() {  # <node index>
  local i="$1" out rc=0
  out="$("${SSH[@]}" "${NODE_ADDRS[$i]}" "cd $(printf '%q' "$PROJ_HOME") 2>/dev/null || exit 3; \
    [ -x $(printf '%q' "$PY") ] || exit 4; $(printf '%q' "$PY") -m aquila.launch check-node \
    --hostfile $(printf '%q' "$HOSTFILE") --rank $i 2>&1" </dev/null 2>&1)" || rc=$?
  case "$rc" in
    0) return 0 ;;
    3) out="the project directory $PROJ_HOME is not there (it must be the same path on every node)" ;;
    4) out="$PY is not there (the same Python environment must be at the same path on every node)" ;;
    255) out="cannot connect with '${SSH[*]}': $(tail -n 1 <<<"$out")" ;;
    *) out="$(grep -m 1 '^error: ' <<<"$out" || tail -n 1 <<<"$out")" && out="${out#error: }" ;;
  esac
  echo "error: $ME: node $i (${NODE_ADDRS[$i]}): $out" >&2
  exit 2
}
for i in "${!NODE_ADDRS[@]}"; do
  [[ "${NODE_LOCAL[$i]}" == 1 ]] || check_remote "$i"
done

SAVE_DIR="$PROJ_HOME/checkpoints_out/$EXP_NAME/$EXP_VERSION"
LOGFILE="$SAVE_DIR/$(basename "$CONFIG").log.txt"
JOB_ID="$EXP_NAME/$EXP_VERSION/$(date +%s).$$"

# The master port, when the master is this machine: lock its file and check the port in one step, so that two
# triggers at the same moment cannot both take it. The lock lives on this shell's descriptor PORT_FD, which the
# local nodes (their scripts and torchrun) inherit: it is held while the job runs here and dropped when it ends.
PORT_FD=
without_port_lock() {  # run a command that may leave something behind (ssh's connection sharing) without the lock
  if [[ -n "$PORT_FD" ]]; then "$@" {PORT_FD}>&-; else "$@"; fi
}
if [[ -n "$PORT_LOCK" ]]; then
  exec {PORT_FD}<>"$PORT_LOCK" || die "cannot open $PORT_LOCK"
  "$PY" -m aquila.launch claim-port --fd "$PORT_FD" --address="$MASTER_ADDR" --port "$MASTER_PORT" \
    --job-id="$JOB_ID" || exit 2
fi
echo "NODES_NUM: $NODES_NUM"
echo "LOGFILE: $LOGFILE"
"$PY" -m aquila.launch start-job --save-dir="$SAVE_DIR" --proj-home="$PROJ_HOME" --job-id="$JOB_ID" \
  --field "NODES_NUM=$NODES_NUM" --field "LOGFILE=$LOGFILE" --field "HOSTFILE=$HOSTFILE" \
  --field "CONFIG=$CONFIG" --field "MODEL_NAME=$MODEL_NAME" --field "SCRIPT_FILE=$SCRIPT_FILE" || exit 2

# What every node's bmtrain_mgpu.sh gets in its environment (remote shells do not inherit ours): the job's
# settings, NCCL_* GLOO_* WANDB_* TORCH_* OMP_NUM_THREADS PYTHONPATH, and the variables named in
# AQUILA_EXPORT_ENV (space-separated, like mpirun -x).
node_env=("AQUILA_JOB_ID=$JOB_ID" "AQUILA_TRIGGER_CHECKED=1" "AQUILA_PYTHON=$PY" "MASTER_PORT=$MASTER_PORT" "SCRIPT_FILE=$SCRIPT_FILE")
read -r -a exported <<<"${AQUILA_EXPORT_ENV:-}"
while IFS= read -r name; do
  case " ${exported[*]} " in *" $name "*) node_env+=("$name=${!name}"); continue ;; esac
  case "$name" in NCCL_* | GLOO_* | WANDB_* | TORCH_* | OMP_NUM_THREADS | PYTHONPATH) node_env+=("$name=${!name}") ;; esac
done < <(compgen -e)

stop_started() {
  echo "error: $ME: node $1 (${NODE_ADDRS[$1]}) could not be started; stopping the nodes already started" >&2
  without_port_lock bash "$SCRIPT_DIR/dist_stop_docker.sh" "$HOSTFILE" --job-id "$JOB_ID" >&2 || true
  exit 1
}

for i in "${!NODE_ADDRS[@]}"; do
  log="$LOGFILE"
  [[ "$i" -eq 0 ]] || log="$SAVE_DIR/launch/node$i.log.txt"
  # setsid: each node runs in its own session, detached from this terminal.
  cmd=(env "${node_env[@]}" setsid bash "$SCRIPT_DIR/bmtrain_mgpu.sh" "$HOSTFILE" "$CONFIG" "$MODEL_NAME" \
    "$EXP_NAME" "$EXP_VERSION" "$i")
  if [[ "${NODE_LOCAL[$i]}" == 1 ]]; then
    # (the '&' must cover only the command: a backgrounded 'cd && cmd' would keep our stdout open)
    (cd "$PROJ_HOME" || exit 1; "${cmd[@]}" >"$log" 2>&1 </dev/null &) || stop_started "$i"
  else
    remote="cd $(printf '%q' "$PROJ_HOME") || exit 1; $(printf '%q ' "${cmd[@]}") >$(printf '%q' "$log") 2>&1 </dev/null &"
    without_port_lock "${SSH[@]}" "${NODE_ADDRS[$i]}" "$remote" </dev/null || stop_started "$i"
  fi
  echo "node $i: ${NODE_ADDRS[$i]} slots=${NODE_SLOTS[$i]} started"
done
[[ "$NODES_NUM" -eq 1 ]] || echo "other nodes' logs: $SAVE_DIR/launch/node<rank>.log.txt"

if [[ "$FOLLOW" != 1 ]]; then
  echo "follow: tail -f $LOGFILE    stop: bash dist_stop_docker.sh $(printf '%q' "${args[0]}")"
  exit 0
fi
# 0: finished; 75: stopped on SIGTERM after saving a checkpoint (the same command resumes); 143: stopped before
# that; 130: Ctrl-C (the job keeps running); anything else: a node failed, and the rest of the job is stopped.
rc=0
"$PY" -m aquila.launch follow --save-dir="$SAVE_DIR" --log="$LOGFILE" || rc=$?
if [[ "$rc" -eq 130 ]]; then
  echo "stopped following; the job keeps running (stop: bash dist_stop_docker.sh $(printf '%q' "${args[0]}"))" >&2
elif [[ "$rc" -ne 0 && "$rc" -ne 75 ]]; then
  without_port_lock bash "$SCRIPT_DIR/dist_stop_docker.sh" "$HOSTFILE" --job-id "$JOB_ID" >&2 || true
fi
exit "$rc"
