#!/usr/bin/env bash
# The GRPO baseline: outcome-reward RL with the rule reward (math grading), no teacher. Same launcher as OPD
# (on_policy_distillation.sh, whose header lists every variable); only the defaults that differ for GRPO are set
# here, each ${VAR:-default} so the environment still wins. Extra arguments go to `opd train` unchanged.
# The local engine samples with the trainer's own weights and kernels, so the rollout log-probs equal the trainer's
# and GRPO's truncated importance weights (needed only with a separate rollout engine such as vLLM) are 1.
#
#   ACTOR_MODEL_PATH=/models/student bash grpo.sh [key=value ...]
set -euo pipefail

# Which variables did the caller set? Recorded before any default is applied (grpo.sh records it first), so that
# `--config run.yaml` beats the launcher's defaults while the caller's own variables still beat the YAML.
if [ -z "${OPD_CALLER_ENV+x}" ]; then
  OPD_CALLER_ENV=""
  for _v in $(compgen -e); do [ -n "${!_v}" ] && OPD_CALLER_ENV+="$_v "; done
  export OPD_CALLER_ENV
fi

export ADV_ESTIMATOR="${ADV_ESTIMATOR:-grpo}"
export N_RESPONSES="${N_RESPONSES:-8}"
export LOG_PROB_TOP_K="${LOG_PROB_TOP_K:-0}"
export VAL_TEMPERATURE="${VAL_TEMPERATURE:-1.0}"

exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/on_policy_distillation.sh" "$@"
