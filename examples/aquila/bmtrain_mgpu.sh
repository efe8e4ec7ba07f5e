#!/usr/bin/env bash
# Run one node of a training job: torchrun with this node's rank and process count (FlagAI's bmtrain_mgpu.sh).
# usage: bash bmtrain_mgpu.sh <hostfile> <config.yaml> <model_name> <exp_name> <exp_version> [node_rank]
# Normally started by dist_trigger_docker.sh / local_trigger_docker.sh, which pass node_rank explicitly.
# Without node_rank the hostfile line that is this machine is used. PROJ_HOME is the current directory.
# Environment: MASTER_PORT (default 23456), SCRIPT_FILE (default aquila_pretrain.py, or aquila_sft.py for an
# SFT YAML), AQUILA_PYTHON (the Python environment), OMP_NUM_THREADS, WANDB_MODE (default offline),
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (default: the interface holding this node's hostfile address).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJ_HOME="$PWD"
# shellcheck source=launch_common.sh
source "$SCRIPT_DIR/launch_common.sh"

[[ $# -eq 5 || $# -eq 6 ]] || die "usage: bmtrain_mgpu.sh <hostfile> <config.yaml> <model_name> <exp_name> <exp_version> [node_rank]"
HOSTFILE="$(abspath "$1")"
CONFIG="$(abspath "$2")"
MODEL_NAME="$3"
EXP_NAME="$4"
EXP_VERSION="$5"
NODE_RANK="${6:-}"
[[ -z "$NODE_RANK" || "$NODE_RANK" =~ ^[0-9]+$ ]] || die "node_rank must be a non-negative integer, got '$NODE_RANK'"
find_python
# The names become directories below: check them before anything is created (one line, exit 2).
"$PY" -m aquila.launch check-names --exp="$EXP_NAME" --version="$EXP_VERSION" || exit 2

SAVE_DIR="$PROJ_HOME/checkpoints_out/$EXP_NAME/$EXP_VERSION"
WANDB_DIR="$PROJ_HOME/wandb/$EXP_NAME/$EXP_VERSION"
# Every process of the job carries this id; the stop scripts end exactly the processes that have it.
export AQUILA_JOB_ID="${AQUILA_JOB_ID:-$EXP_NAME/$EXP_VERSION}"
mkdir -p "$SAVE_DIR/launch" "$WANDB_DIR"

# Record this node's exit status (the trigger's --follow and the tests wait for it):
# 0 finished, 75 the training processes stopped on SIGTERM after saving a checkpoint (dist_stop_docker.sh, or a
# preemption signalling them directly), 143 stopped (SIGTERM) before that, anything else failed.
on_exit() {
  local rc=$?
  if [[ -n "$NODE_RANK" ]]; then
    echo "$rc" >"$SAVE_DIR/launch/node$NODE_RANK.exit.tmp" && mv -f "$SAVE_DIR/launch/node$NODE_RANK.exit.tmp" "$SAVE_DIR/launch/node$NODE_RANK.exit"
  fi
}
trap on_exit EXIT
# While torchrun runs, a SIGTERM (the stop scripts) is noted and bash waits for torchrun: the trainers stop at a
# step boundary and checkpoint first. Before that it ends the script at once.
TRAINING=0
TERMED=0
trap 'TERMED=1; [[ "$TRAINING" == 1 ]] || exit 143' TERM
trap 'exit 130' INT

# Validate the inputs, record this node's pid, and get NODES_NUM NODE_RANK NPROC_PER_NODE MASTER_ADDR
# MASTER_PORT SCRIPT_FILE TRAIN_ARGS DEFAULT_OMP_THREADS SOCKET_IFNAME (checks the port is free on the master,
# and that this node's hostfile address is on one of its interfaces).
plan="$("$PY" -m aquila.launch node-plan --hostfile="$HOSTFILE" --config="$CONFIG" --model="$MODEL_NAME" \
  --exp="$EXP_NAME" --version="$EXP_VERSION" --proj-home="$PROJ_HOME" --script-dir="$SCRIPT_DIR" \
  --save-dir="$SAVE_DIR" --job-id="$AQUILA_JOB_ID" --pid "$$" ${NODE_RANK:+--rank="$NODE_RANK"} --check-port)" || exit 2
eval "$plan"

# torchrun from the same environment as $PY (never whatever else is first on PATH).
TORCHRUN=("$(dirname "$PY")/torchrun")
if [[ ! -x "${TORCHRUN[0]}" ]]; then
  "$PY" -c 'import torch.distributed.run' 2>/dev/null || die "torchrun not found: $PY has no torch (install torch there or set AQUILA_PYTHON)"
  TORCHRUN=("$PY" -m torch.distributed.run)
fi

# Threads per process: the node's CPUs shared among its processes, unless set. Collectives bind the interface
# that holds this node's hostfile address (not whatever the host name resolves to), unless set.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$DEFAULT_OMP_THREADS}"
if [[ -n "$SOCKET_IFNAME" ]]; then
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}"
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}"
fi
export WANDB_MODE="${WANDB_MODE:-offline}"
export WANDB_DIR

if command -v nvidia-smi >/dev/null 2>&1 && [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  if [[ "$gpus" -gt 0 && "$NPROC_PER_NODE" -gt "$gpus" ]]; then
    echo "warning: slots=$NPROC_PER_NODE but this node has $gpus GPUs" >&2
  fi
fi

# Back up the YAML and hostfile beside the checkpoints (once, from the master node).
if [[ "$NODE_RANK" == 0 ]]; then
  for f in "$CONFIG" "$HOSTFILE"; do
    [[ "$(dirname "$f")" -ef "$SAVE_DIR" ]] || cp -f "$f" "$SAVE_DIR/"
  done
fi

# TRAIN_ARGS are FlagAI's flags (aquila/launch/train_check.py: --batch_size 6 --epochs 1 ... --lr 6.0e-5, and
# the run's directories); the YAML overrides every one of them. Each process runs the script through
# aquila.launch.worker, which records a stop with a checkpoint (exit 75) instead of letting torchrun report it
# as a failed child.
STOP_RECORD="$SAVE_DIR/launch/node$NODE_RANK.stopped"
rm -f "$STOP_RECORD" "$STOP_RECORD".local*
export AQUILA_STOP_RECORD="$STOP_RECORD"
cmd=("${TORCHRUN[@]}" --nnodes "$NODES_NUM" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
  -m aquila.launch.worker "$SCRIPT_FILE" "${TRAIN_ARGS[@]}")
echo "[$(date '+%F %T')] $(hostname) node $NODE_RANK/$NODES_NUM, $NPROC_PER_NODE processes, master $MASTER_ADDR:$MASTER_PORT, job $AQUILA_JOB_ID, GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-(unset)}"
echo "+ ${cmd[*]}"
TRAINING=1
rc=0
"${cmd[@]}" || rc=$?
TRAINING=0
stopped=("$STOP_RECORD".local*)
if [[ -e "${stopped[0]}" && "${#stopped[@]}" == "$NPROC_PER_NODE" ]]; then
  # Every local process saved a checkpoint and stopped (whatever torchrun's own status: a preemption that signals
  # every process gives it SIGTERM too). Say who stopped it: the stop scripts signal this script and spare
  # torchrun; a preemption signals the training processes (and perhaps torchrun).
  by=preemption
  [[ "$TERMED" == 1 && "$rc" == 0 ]] && by=stop
  echo "by=$by" >"$STOP_RECORD.tmp" && mv -f "$STOP_RECORD.tmp" "$STOP_RECORD"
  rm -f "$STOP_RECORD".local*
  echo "[$(date '+%F %T')] node $NODE_RANK: the training processes stopped on SIGTERM ($by) after saving a checkpoint; run the same command to resume"
  exit 75
fi
[[ "$TERMED" == 1 ]] && exit 143
exit "$rc"
