#!/usr/bin/env bash
# The test suite: installs what it needs into .venv (fresh machine: Python 3.11 + pip suffice), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# verl (the scale-out engine) is installed too: its tests run verl's own trainer on CPU through our plugin.
bash scripts/install.sh dev,dedup,verl
# LlamaFactory lives in its own environment (transformers pin); the export test loads our dataset with its loader.
# OPD_TEST_LLAMAFACTORY=0 skips it; a failed install only skips that one test, with the reason in the summary.
if [ "${OPD_TEST_LLAMAFACTORY:-1}" != "0" ] && [ -z "${OPD_LLAMAFACTORY_PYTHON:-}" ]; then
  if bash scripts/install_llamafactory.sh .venv-llamafactory > .venv-llamafactory.log 2>&1; then
    export OPD_LLAMAFACTORY_PYTHON="$PWD/.venv-llamafactory/bin/python"
  else
    echo "WARNING: LlamaFactory did not install (see .venv-llamafactory.log); its loader test will be skipped" >&2
    tail -5 .venv-llamafactory.log >&2 || true
  fi
fi
. .venv/bin/activate
# Two shared cores: one thread per test process is faster and steadier than two.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# lint and format (ruff, 120 columns; configuration in pyproject.toml), then the tests
ruff check .
ruff format --check .
python -m pytest -q "$@"
