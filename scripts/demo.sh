#!/usr/bin/env bash
# The embedded end-to-end demo: install, build a toy world, SFT teacher + student, OPD, evaluate, report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
opd demo "$@"
