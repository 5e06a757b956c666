#!/usr/bin/env bash
# A separate virtual environment with LlamaFactory (it pins transformers <=5.6.0, which verl does not accept, so it
# cannot share .venv). Used by the test suite to load our exported SFT dataset with LlamaFactory's own loader, and
# by users who run the paper's cold start with `llamafactory-cli train`.
# Usage: bash scripts/install_llamafactory.sh [venv folder, default .venv-llamafactory]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-llamafactory}"
PY="${PYTHON:-python3}"
LLAMAFACTORY_VERSION="${LLAMAFACTORY_VERSION:-0.9.5}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# CPU torch from the local wheel first; the constraints file keeps LlamaFactory's resolve on it (no CUDA torch).
"$VENV/bin/python" -m pip install -q -c constraints.txt torch==2.13.0
"$VENV/bin/python" -m pip install -q -c constraints.txt "llamafactory==${LLAMAFACTORY_VERSION}"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "LlamaFactory ${LLAMAFACTORY_VERSION} installed in $VENV"
