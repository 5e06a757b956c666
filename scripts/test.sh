#!/usr/bin/env bash
# The test suite: installs what it needs into .venv (fresh machine: Python 3.11 + pip suffice), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,dedup
. .venv/bin/activate
# Two shared cores: one thread per test process is faster and steadier than two.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
