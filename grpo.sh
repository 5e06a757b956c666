#!/usr/bin/env bash
# The GRPO baseline: outcome-reward RL with the rule reward (math grading), no teacher. It is on_policy_distillation.sh
# with PRESET=grpo (the header there lists every variable; its grpo block shows the defaults that differ: n=8, K=0,
# validation temperature 1.0), so the environment still wins and extra arguments go to `opd train` unchanged.
# The local engine samples with the trainer's own weights and kernels, so the rollout log-probs equal the trainer's
# and GRPO's truncated importance weights (needed only with a separate rollout engine such as vLLM) are 1.
#
#   ACTOR_MODEL_PATH=/models/student bash grpo.sh [key=value ...]
set -euo pipefail

PRESET=grpo exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/on_policy_distillation.sh" "$@"
