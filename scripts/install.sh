#!/usr/bin/env bash
# Creates .venv (if missing) and installs opd with the given extras on the CPU torch wheel.
# Usage: bash scripts/install.sh [extras]   e.g. bash scripts/install.sh dev,dedup
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned to the CPU wheel on disk; the constraints file keeps every later resolve on it.
python -m pip install -q -c constraints.txt torch==2.13.0
if [ -n "$EXTRAS" ]; then
  python -m pip install -q -c constraints.txt -e ".[${EXTRAS}]"
else
  python -m pip install -q -c constraints.txt -e .
fi
# torchvision/torchaudio/torchcodec from PyPI break `import transformers` beside CPU torch.
python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
