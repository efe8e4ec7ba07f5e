# Sourced by the launch scripts (needs SCRIPT_DIR): one-line errors, absolute paths, the Python environment.
# shellcheck shell=bash

die() { echo "error: $(basename "$0"): $*" >&2; exit 2; }
abspath() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }

# Sets PY: $AQUILA_PYTHON, else the active venv, the repo's .venv, python3 on PATH.
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
