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
for v in "$EXP_NAME" "$EXP_VERSION"; do
  [[ "$v" =~ ^[A-Za-z0-9._-]+$ && "$v" != . && "$v" != .. ]] || die "experiment name/version '$v' may only contain letters, digits, '.', '_' and '-'"
done
[[ -z "$NODE_RANK" || "$NODE_RANK" =~ ^[0-9]+$ ]] || die "node_rank must be a non-negative integer, got '$NODE_RANK'"

SAVE_DIR="$PROJ_HOME/checkpoints_out/$EXP_NAME/$EXP_VERSION"
WANDB_DIR="$PROJ_HOME/wandb/$EXP_NAME/$EXP_VERSION"
PRE_LOAD_DIR="$PROJ_HOME/checkpoints_in"
# Every process of the job carries this id; the stop scripts end exactly the processes that have it.
export AQUILA_JOB_ID="${AQUILA_JOB_ID:-$EXP_NAME/$EXP_VERSION}"
mkdir -p "$SAVE_DIR/launch" "$WANDB_DIR"

# Record this node's exit status (the trigger's --follow and the tests wait for it).
on_exit() {
  local rc=$?
  if [[ -n "$NODE_RANK" ]]; then
    echo "$rc" >"$SAVE_DIR/launch/node$NODE_RANK.exit.tmp" && mv -f "$SAVE_DIR/launch/node$NODE_RANK.exit.tmp" "$SAVE_DIR/launch/node$NODE_RANK.exit"
  fi
}
trap on_exit EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

find_python
# Validate the inputs, record this node's pid, and get NODES_NUM NODE_RANK NPROC_PER_NODE MASTER_ADDR
# MASTER_PORT SCRIPT_FILE DEFAULT_OMP_THREADS SOCKET_IFNAME (checks the port is free on the master, and that
# this node's hostfile address is on one of its interfaces).
plan="$("$PY" -m aquila.launch node-plan --hostfile "$HOSTFILE" --config "$CONFIG" --model "$MODEL_NAME" \
  --exp "$EXP_NAME" --proj-home "$PROJ_HOME" --script-dir "$SCRIPT_DIR" --save-dir "$SAVE_DIR" \
  --job-id "$AQUILA_JOB_ID" --pid "$$" ${NODE_RANK:+--rank "$NODE_RANK"} --check-port)" || exit 2
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

# FlagAI's command-line defaults; the YAML overrides every one of them.
EPOCH_NUM=1
BATCH_SIZE=6
GRADIENT_ACCUM_STEPS=1
LR=6.0e-5
WARMUP_RATE=0.2
WEIGHT_DECAY=0.1

cmd=("${TORCHRUN[@]}" --nnodes "$NODES_NUM" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
  "$SCRIPT_FILE" --not_call_launch
  --batch_size "$BATCH_SIZE" --epochs "$EPOCH_NUM" --gradient_accumulation_steps "$GRADIENT_ACCUM_STEPS"
  --lr "$LR" --warm_up "$WARMUP_RATE" --weight_decay "$WEIGHT_DECAY" --adam_beta1 0.9 --adam_beta2 0.95
  --save_dir "$SAVE_DIR" --pre_load_dir "$PRE_LOAD_DIR" --experiment_name "$EXP_NAME" --model_name "$MODEL_NAME"
  --wandb_dir "$WANDB_DIR" --yaml_config "$CONFIG")
echo "[$(date '+%F %T')] $(hostname) node $NODE_RANK/$NODES_NUM, $NPROC_PER_NODE processes, master $MASTER_ADDR:$MASTER_PORT, job $AQUILA_JOB_ID, GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-(unset)}"
echo "+ ${cmd[*]}"
"${cmd[@]}"
