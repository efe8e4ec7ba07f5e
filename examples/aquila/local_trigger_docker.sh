#!/usr/bin/env bash
# Start a training job on this machine only (FlagAI's local_trigger_docker.sh).
# usage: bash local_trigger_docker.sh [--follow] <hostfile> <config.yaml> <model_name> <exp_name>
# The hostfile must have exactly one line, and its address must be this machine (e.g. 127.0.0.1 slots=2).
set -euo pipefail
AQUILA_LOCAL_ONLY=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/dist_trigger_docker.sh" "$@"
