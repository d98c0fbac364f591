#!/usr/bin/env bash
# Create .venv with Python 3.12 and install kubetron with every extra. Idempotent: a stamp file
# records the hash of the inputs, so a second run with nothing changed returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.kubetron-setup-stamp"
want=$(cat pyproject.toml requirements-constraints.txt hack/setup-venv.sh | sha256sum | cut -d' ' -f1)
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

find_python() {
  for c in "${PYTHON:-}" python3.12 ~/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [[ -n "$c" ]] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

PY=$(find_python || true)
if [[ -z "$PY" ]]; then
  echo "setup: no Python 3.12 found; installing it with apt-get (python3.12, python3.12-venv)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq python3.12 python3.12-venv >/dev/null
  PY=$(find_python) || { echo "setup: Python 3.12 is required; set PYTHON=/path/to/python3.12" >&2; exit 1; }
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q -c requirements-constraints.txt -e '.[operator,trainer,dev]'
echo "$want" > "$STAMP"
echo "setup: .venv ready ($("$VENV/bin/python" --version))"
