#!/usr/bin/env bash
# The main job: pretrain aquila-tiny on the demo corpus through FlagAI's launcher (2 local processes),
# wait for it, then load the checkpoint with AutoLoader and generate Chinese and English text.
set -euo pipefail
cd "$(dirname "$0")"

EXP="${AQUILA_DEMO_EXP:-demo}"
echo "== pretraining aquila-tiny: bash dist_trigger_docker.sh --follow hostfile Aquila-pretrain-tiny.yaml aquila-tiny $EXP"
bash dist_trigger_docker.sh --follow hostfile Aquila-pretrain-tiny.yaml aquila-tiny "$EXP"

RUN_DIR=$(find "checkpoints_out/$EXP" -mindepth 1 -maxdepth 1 -type d -name "[0-9]*" | sort | tail -n 1)
echo "== generating from the latest checkpoint in $RUN_DIR"
python generate_demo.py "$RUN_DIR"
