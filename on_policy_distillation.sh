#!/usr/bin/env bash
# On-policy distillation (OPD): the student samples answers to math prompts, the teacher scores every token of them
# (top-k reverse KL by default), and the student is updated on its own samples. ENGINE=local runs `opd train` (one
# process, CPU or one GPU); ENGINE=verl runs verl's own trainer (Ray, FSDP, vLLM; the `opd` trainer mode) with the
# same variables, plus the cluster knobs below, and extra arguments as Hydra overrides (docs/verl.md).
#
#   ACTOR_MODEL_PATH=/models/student REWARD_MODEL_PATH=/models/teacher bash on_policy_distillation.sh [key=value ...]
#
# Every knob below is ${VAR:-default}: a variable set in the environment wins over the default shown. Extra
# arguments go to `opd train` unchanged (key=value overrides such as lr=5e-4 or algo.tail_bucket=true, --config
# run.yaml, or --print-config to show the resolved configuration and stop). The defaults shown equal the presets in
# opd/presets.py over the engine's own (tests/engine/test_launchers.py checks it), which is how `opd train` tells
# them apart from yours: a variable equal to its default here does not beat a --config YAML. grpo.sh is this script
# with PRESET=grpo. No model path? `opd demo` builds a toy teacher and student.
#
# PRESET               opd (empty: opd, or the preset a --config YAML names) | grpo (the GRPO baseline, grpo.sh)
# ENGINE               local | verl                      ADV_ESTIMATOR   token_reward_direct | token_reward_direct_plus_grpo
# ACTOR_MODEL_PATH     student (local HF folder)                         | token_grpo | grpo
# REWARD_MODEL_PATH    teacher (same vocabulary)         N_RESPONSES     rollouts per prompt
# MINI_BATCH_SIZE      prompts per optimiser step        MAX_PROMPT_LENGTH  longer prompts are dropped (counted)
# MAX_RESP_LENGTH      training response tokens          MAX_VAL_RESP_LENGTH  validation response tokens
# LOG_PROB_TOP_K       K; 0 = sampled token; -1 = full vocabulary
# TOP_K_STRATEGY       only_stu | only_tch | intersection | union | union-intersection
# REWARD_WEIGHT_MODE   student_p | teacher_p | none      TEMPERATURE / TEACHER_TEMPERATURE  rollout / teacher logits
# REPETITION_PENALTY   rollout                           TOP_P           rollout nucleus
# LR, LR_SCHEDULER     AdamW lr; constant | cosine (3% warmup)
# USE_KL               KL-to-reference loss (coef 0.005) ENABLE_FORMAT_REWARD  no loss on responses without \boxed
# LOSS_AGG_MODE        token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
# POLICY_LOSS          ppo (dual-clip surrogate) | importance_sampling | a registered name
# MODEL_DTYPE          fp32 | bf16 | fp16                GRPO_OUTCOME_WEIGHT  for token_reward_direct_plus_grpo
# TEACHER_DTYPE        teacher/reference dtype (empty: MODEL_DTYPE)   GRADIENT_CHECKPOINTING  recompute in backward
# TRAIN_DATASET        RL parquet                        TEST_FILE       comma-separated RL parquets (validation)
# ENABLE_THINKING      chat-template switch (empty: not passed)
# SAVE_FREQ, TEST_FREQ checkpoint / validate every N steps (0: never)   TOTAL_EPOCHS, TOTAL_STEPS (optional cap)
# KEEP_LAST_N          keep only the newest N checkpoints (0: all; 2 or more keeps a fallback if the newest is damaged)
# VAL_N, VAL_TEMPERATURE, VAL_TOP_P, VAL_BEFORE_TRAIN   validation sampling (mean@n / best@n / maj@n per source)
# RESUME               auto (continue from the run's last checkpoint) | off | <checkpoint folder>
# OUTPUT_DIR, RUN_NAME run folder = OUTPUT_DIR/RUN_NAME (empty RUN_NAME: built from the settings)
# SEED                 everything random (sampling, data order)
# MICRO_BATCH_TOKENS   token budget of one forward/backward   ROLLOUT_BATCH_SIZE  sequences per sampler call
# DEVICE               auto | cpu | cuda | cuda:N        PYTHON          interpreter (default: .venv next to this file)
# ENGINE=verl only:    NNODES (1), N_GPUS_PER_NODE (actor GPUs per node; default: all visible minus the teacher's),
#                      TEACHER_N_GPUS (1), ROLLOUT_BACKEND (vllm | sglang; opd_hf on CPU), RAY_ADDRESS (join a cluster)
set -euo pipefail

ENGINE="${ENGINE:-local}"
PRESET="${PRESET:-}"

# --- the GRPO baseline's departures from the OPD defaults below (the preset grpo) ---
case "$PRESET" in
  "" | opd) ;;
  grpo)
    export ADV_ESTIMATOR="${ADV_ESTIMATOR:-grpo}"
    export N_RESPONSES="${N_RESPONSES:-8}"
    export LOG_PROB_TOP_K="${LOG_PROB_TOP_K:-0}"
    export VAL_TEMPERATURE="${VAL_TEMPERATURE:-1.0}"
    ;;
  *)
    echo "$(basename "$0"): PRESET=$PRESET is not valid; expected opd or grpo (others: opd train --preset)" >&2
    exit 2
    ;;
esac

# --- models and algorithm ---
export ACTOR_MODEL_PATH="${ACTOR_MODEL_PATH:-}"
export REWARD_MODEL_PATH="${REWARD_MODEL_PATH:-}"
export ADV_ESTIMATOR="${ADV_ESTIMATOR:-token_reward_direct}"
export LOG_PROB_TOP_K="${LOG_PROB_TOP_K:-16}"
export TOP_K_STRATEGY="${TOP_K_STRATEGY:-only_stu}"
export REWARD_WEIGHT_MODE="${REWARD_WEIGHT_MODE:-student_p}"
export TEACHER_TEMPERATURE="${TEACHER_TEMPERATURE:-1.0}"
export GRPO_OUTCOME_WEIGHT="${GRPO_OUTCOME_WEIGHT:-1.0}"
export USE_KL="${USE_KL:-False}"
export ENABLE_FORMAT_REWARD="${ENABLE_FORMAT_REWARD:-False}"
export LOSS_AGG_MODE="${LOSS_AGG_MODE:-token-mean}"
export POLICY_LOSS="${POLICY_LOSS:-ppo}"
export MODEL_DTYPE="${MODEL_DTYPE:-fp32}"
export TEACHER_DTYPE="${TEACHER_DTYPE:-}"

# --- data ---
export TRAIN_DATASET="${TRAIN_DATASET:-data/dapo_math_17k.parquet}"
export TEST_FILE="${TEST_FILE:-data/aime24.parquet,data/aime25.parquet,data/amc23.parquet}"
export MAX_PROMPT_LENGTH="${MAX_PROMPT_LENGTH:-1024}"
export ENABLE_THINKING="${ENABLE_THINKING:-}"

# --- rollout ---
export N_RESPONSES="${N_RESPONSES:-4}"
export MINI_BATCH_SIZE="${MINI_BATCH_SIZE:-64}"
export MAX_RESP_LENGTH="${MAX_RESP_LENGTH:-7168}"
export TEMPERATURE="${TEMPERATURE:-1.0}"
export TOP_P="${TOP_P:-1.0}"
export REPETITION_PENALTY="${REPETITION_PENALTY:-1.0}"
export ROLLOUT_BATCH_SIZE="${ROLLOUT_BATCH_SIZE:-64}"

# --- validation ---
export MAX_VAL_RESP_LENGTH="${MAX_VAL_RESP_LENGTH:-31744}"
export VAL_N="${VAL_N:-16}"
export VAL_TEMPERATURE="${VAL_TEMPERATURE:-0.7}"
export VAL_TOP_P="${VAL_TOP_P:-0.95}"
export VAL_BEFORE_TRAIN="${VAL_BEFORE_TRAIN:-True}"

# --- optimisation and schedule ---
export LR="${LR:-1e-6}"
export LR_SCHEDULER="${LR_SCHEDULER:-constant}"
export MICRO_BATCH_TOKENS="${MICRO_BATCH_TOKENS:-16384}"
export GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-False}"
export TOTAL_EPOCHS="${TOTAL_EPOCHS:-1}"
export TOTAL_STEPS="${TOTAL_STEPS:-}"
export SAVE_FREQ="${SAVE_FREQ:-20}"
export KEEP_LAST_N="${KEEP_LAST_N:-0}"
export TEST_FREQ="${TEST_FREQ:-20}"
export SEED="${SEED:-0}"

# --- outputs and machine ---
export OUTPUT_DIR="${OUTPUT_DIR:-runs}"
export RUN_NAME="${RUN_NAME:-}"
export RESUME="${RESUME:-auto}"
export DEVICE="${DEVICE:-auto}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi

case "$ENGINE" in
  local)
    exec "$PYTHON" -m opd.cli train --from-env ${PRESET:+--preset "$PRESET"} "$@"
    ;;
  verl)
    # verl's own main_ppo, built from the same variables (opd/engines/verl/launch.py maps each to its verl key)
    exec "$PYTHON" -m opd.engines.verl.launch ${PRESET:+--preset "$PRESET"} "$@"
    ;;
  *)
    echo "$(basename "$0"): ENGINE=$ENGINE is not valid; expected local or verl" >&2
    exit 2
    ;;
esac
