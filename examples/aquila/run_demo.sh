#!/usr/bin/env bash
# The main job: the model card's workflow on the tiny model, through FlagAI's launcher with 2 local processes.
#   1. pretrain aquila-tiny on the demo corpus (Aquila-pretrain-tiny.yaml);
#   2. SFT from that run's last checkpoint (Aquila-sft-tiny.yaml with pre_load_dir = the pretrain save_dir,
#      model_name = its step, bmt_pre_load: True, as the model card's SFT YAML does);
#   3. one loss summary, greedy continuations of the pretrained model and greedy chat with the SFT model;
#   4. `aquila plot` of both runs' losses.
# Runs in examples/aquila (PROJ_HOME); each run starts fresh: the experiments' earlier output is removed first.
# Environment (for tests): AQUILA_DEMO_HOME (PROJ_HOME), AQUILA_DEMO_EXP (experiment name, default "demo"),
# AQUILA_DEMO_PRETRAIN_YAML, AQUILA_DEMO_SFT_YAML, AQUILA_PYTHON.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "${AQUILA_DEMO_HOME:-$SCRIPT_DIR}"

EXP="${AQUILA_DEMO_EXP:-demo}"
SFT_EXP="$EXP-sft"
PRETRAIN_YAML="${AQUILA_DEMO_PRETRAIN_YAML:-Aquila-pretrain-tiny.yaml}"
SFT_YAML="${AQUILA_DEMO_SFT_YAML:-Aquila-sft-tiny.yaml}"
PY="${AQUILA_PYTHON:-python}"

latest_run() {  # the newest <version> directory of an experiment (absolute path)
  find "$PWD/checkpoints_out/$1" -mindepth 1 -maxdepth 1 -type d -name "[0-9]*" | sort | tail -n 1
}

[[ "$EXP" =~ ^[A-Za-z0-9._-]+$ && "$EXP" != . && "$EXP" != .. ]] || {
  echo "error: AQUILA_DEMO_EXP '$EXP' may only contain letters, digits, '.', '_' and '-'" >&2
  exit 2
}
rm -rf "checkpoints_out/$EXP" "checkpoints_out/$SFT_EXP"

echo "== 1/4 pretraining: bash dist_trigger_docker.sh --follow hostfile $PRETRAIN_YAML aquila-tiny $EXP"
bash "$SCRIPT_DIR/dist_trigger_docker.sh" --follow hostfile "$PRETRAIN_YAML" aquila-tiny "$EXP"
PRETRAIN_RUN="$(latest_run "$EXP")"
read -r STEP _ <"$PRETRAIN_RUN/latest_iteration.txt"  # "<step>\t<step>" (FlagAI's tracker)

# This run's SFT YAML: the given one, pointed at the pretraining checkpoint (whose tokenizer comes with it).
mkdir -p "checkpoints_out/$SFT_EXP"
RUN_SFT_YAML="checkpoints_out/$SFT_EXP/$(basename "$SFT_YAML")"
{
  grep -v -E '^(model_name|bmt_pre_load|pre_load_dir|tokenizer_dir):' "$SFT_YAML"
  echo "pre_load_dir: $PRETRAIN_RUN"
  echo "model_name: \"$STEP\""
  echo "bmt_pre_load: True"
} >"$RUN_SFT_YAML.tmp"
mv -f "$RUN_SFT_YAML.tmp" "$RUN_SFT_YAML"
echo
echo "== 2/4 SFT from $PRETRAIN_RUN/$STEP: bash dist_trigger_docker.sh --follow hostfile $RUN_SFT_YAML $STEP $SFT_EXP"
bash "$SCRIPT_DIR/dist_trigger_docker.sh" --follow hostfile "$RUN_SFT_YAML" "$STEP" "$SFT_EXP"
SFT_RUN="$(latest_run "$SFT_EXP")"

echo
echo "== 3/4 what the models learned"
"$PY" "$SCRIPT_DIR/demo_report.py" "$PRETRAIN_YAML" "$PRETRAIN_RUN" "$RUN_SFT_YAML" "$SFT_RUN"

echo
echo "== 4/4 loss plots"
"$PY" -m aquila plot "$PRETRAIN_RUN"
"$PY" -m aquila plot "$SFT_RUN"
