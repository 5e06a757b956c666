#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run, sized for a few minutes on one H100-class GPU:
#   1. the reward kernels (bf16 logits at V = 151,936, T = 8,192) against the device's measured copy bandwidth;
#   2. one OPD step of Qwen-shaped random models (teacher Qwen3-1.7B's shape, student Qwen3-0.6B's, bf16), phase by
#      phase, with the model FLOP rate and MFU of the update and the teacher's pass;
#   3. the same pair side by side with TRL's DistillationTrainer (only where trl is importable).
# OPD is read from this checkout (PYTHONPATH), so it needs no install; the Python it runs (PYTHON, default python3)
# needs torch with CUDA, transformers, pandas, pyarrow and math-verify, and trl==1.16.0 for step 3.
# Each table is also written to OUT_DIR (default gpu_figures/). SMOKE=1 runs the same three steps on the CPU at toy
# sizes in seconds, to check the script itself.
#
#   bash bench/gpu_figures.sh                 # on the GPU machine
#   SMOKE=1 bash bench/gpu_figures.sh         # anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT_DIR:-gpu_figures}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ "${SMOKE:-0}" == 1 ]]; then
  rewards=(--device cpu --sizes 4096:64 --chunk-sizes 32 --paths topk,slots_hidden --copy-mib 8 --threads 1)
  pair=(--device cpu --shapes qwen3-1.7b:qwen3-0.6b --layers 1)
  step=(--prompts 2 --n 2 --max-resp 4 --steps 1 --warmup 0)
  trl=(--prompts 2 --new-tokens 4 --repeats 3 --steps 1 --vocab toy --ks 16 --compiled-ks '' --no-check)
else
  rewards=(--device cuda --sizes 151936:8192 --chunk-sizes 1024)
  pair=(--device cuda --dtype bf16 --shapes qwen3-1.7b:qwen3-0.6b)
  step=(--vocab 151936 --prompts 16 --n 4 --max-resp 256 --steps 2 --warmup 1)
  trl=(--prompts 16 --new-tokens 128 --repeats 3 --steps 2 --vocab 151936 --ks=-1,16 --compiled-ks '')
fi

"$py" bench/bench_rewards.py "${rewards[@]}" | tee "$out/bench_rewards.md"
"$py" bench/bench_step.py "${pair[@]}" "${step[@]}" --k 16 | tee "$out/bench_step.md"
if "$py" -c "import trl" 2>/dev/null; then
  "$py" bench/compare_trl.py "${pair[@]}" "${trl[@]}" | tee "$out/compare_trl.md"
else
  echo "gpu_figures: trl is not importable by $py: the side-by-side step with TRL is skipped" | tee "$out/compare_trl.md"
fi
