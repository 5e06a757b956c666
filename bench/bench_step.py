"""bench_step: throughput and peak memory of one OPD step of the local engine, phase by phase, on the toy models.

    OMP_NUM_THREADS=2 python bench/bench_step.py                       # CPU, toy teacher/student sizes
    python bench/bench_step.py --device cuda --prompts 64 --n 8 --max-resp 256
    python bench/bench_step.py --device cuda --dtype bf16 --shapes qwen3-1.7b:qwen3-0.6b --vocab 151936 \
        --prompts 32 --n 4 --max-resp 256                           # Qwen-shaped random models (bench/sizes.py)

It builds the toy world in a temporary folder (BPE tokenizer trained locally, teacher and student from
`opd.toy`, untrained, so every response runs to --max-resp tokens: the worst case for the sampler), then times
the phases of a training step with the pieces `trainer.train_step` itself runs: rollout (KV-cached sampling and
grading, `sample_rollouts`), the student's and the teacher's no-grad passes (`score_rollouts`), the core's
support / rewards / advantages (`rollout_targets`), the update (forward + backward + AdamW, `update_student`) and
the dynamics metrics. Warm-up steps are excluded. Tokens/s counts generated
tokens for the rollout, the core's maths, the metrics and the whole step, and prompt + response tokens for the
model passes and the update (the table says which). Peak memory: on CUDA the peak allocated during each phase; on
Linux CPUs the process's resident-set high-water mark during the phase (reset through /proc/self/clear_refs before
each phase; it includes the models, data and interpreter, ~the steady resident set), elsewhere the process's peak.
Prints a markdown table, then the model FLOP rate of the two passes that are matmul-bound at a real model's size:
the update (6 FLOPs per matmul parameter per token: forward + backward, the head only at the response positions,
which is all it runs at) and the teacher's scoring pass (2 per parameter per token), and their MFU against
`--peak-tflops` (by default the dense bf16 peak of a known GPU; none on a CPU). Attention's score and value
products are not counted, as usual: small next to the matmuls at a few hundred positions.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from rss import reset_peak, status_mb  # bench/rss.py, beside this script
from sizes import SHAPES, matmul_params, parse_pair, random_model  # bench/sizes.py

# dense bf16 peak TFLOP/s of the GPUs this is likely to meet (vendor figures, no sparsity)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = status_mb("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _phase(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0, _peak_mb(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step (MINI_BATCH_SIZE)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (N_RESPONSES)")
    parser.add_argument("--max-resp", type=int, default=48, help="response tokens (MAX_RESP_LENGTH)")
    parser.add_argument("--k", type=int, default=16, help="LOG_PROB_TOP_K (-1: full vocabulary)")
    parser.add_argument("--strategy", default="only_stu", help="TOP_K_STRATEGY")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--dtype", default="fp32", help="MODEL_DTYPE: fp32 | bf16 | fp16")
    parser.add_argument(
        "--shapes", default="toy", help=f"TEACHER:STUDENT model shapes ({', '.join(SHAPES)}; bench/sizes.py)"
    )
    parser.add_argument("--vocab", type=int, help="pad both vocabularies to this many rows (e.g. 151936)")
    parser.add_argument("--layers", type=int, help="override both models' depth (a CPU smoke run of a real shape)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for the MFU lines (default: known GPUs)")
    args = parser.parse_args(argv)
    try:
        teacher_shape, student_shape = parse_pair(args.shapes)
    except ValueError as exc:
        parser.error(f"--shapes: {exc}")

    from opd.core.step import step_diagnostics
    from opd.engines.local import trainer
    from opd.engines.local.config import resolve
    from opd.toy import build_toy_tokenizer, save_model, write_datasets

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_toy_tokenizer(root / "tok")
        shape = dict(vocab=args.vocab, layers=args.layers)
        teacher_dir = save_model(random_model(tok, teacher_shape, "teacher", seed=1, **shape), tok, root / "teacher")
        student_dir = save_model(random_model(tok, student_shape, "student", seed=2, **shape), tok, root / "student")
        n_steps = args.warmup + args.steps
        data = write_datasets(root / "data", seed=0, n_train=args.prompts * n_steps, n_dev=1, n_test=1)
        cfg = resolve(
            None,
            {
                "actor_model_path": student_dir,
                "reward_model_path": teacher_dir,
                "train_dataset": str(data["train"]),
                "test_files": [],
                "mini_batch_size": args.prompts,
                "n_responses": args.n,
                "max_resp_length": args.max_resp,
                "micro_batch_tokens": args.micro_batch_tokens,
                "device": args.device,
                "model_dtype": args.dtype,
                "total_steps": n_steps,
                "test_freq": 0,
                "save_freq": 0,
                "progress": False,
                "output_dir": str(root / "runs"),
                "run_name": "bench",
                "lr": 1e-4,
                "algo.top_k": args.k,
                "algo.top_k_strategy": args.strategy,
            },
        )
        s = trainer.setup(cfg)
        rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        flops: dict[str, list[tuple[float, float]]] = {"update": [], "teacher pass": []}  # (FLOPs, seconds)

        def record(name, seconds, tokens, peak):
            rows.setdefault(name, []).append((seconds, tokens, peak))

        for step in range(1, n_steps + 1):
            problems = [s.train_set.problems[i] for i in s.schedule.batch(step)]
            # train_step's own pieces, phase by phase: nothing of the step is restated here
            heads, seen = trainer.step_plan(s, len(problems))
            rollouts, t_roll, m_roll = _phase(device, lambda: trainer.sample_rollouts(s, problems, observe=seen))
            batch = rollouts.batch.to(device)
            gen_tokens = float(batch.response_mask_NT.sum())
            all_tokens = float(batch.attention_mask_NL.sum())
            scores, t_score, m_score = _phase(device, lambda: trainer.score_rollouts(s, batch, heads=heads, seen=seen))
            reads, passes = scores.reads, scores.passes
            targets, t_sig, m_sig = _phase(device, lambda: trainer.rollout_targets(s, rollouts, batch, reads))
            _, t_upd, m_upd = _phase(device, lambda: trainer.update_student(s, batch, targets, scores))
            _, t_diag, m_diag = _phase(device, lambda: step_diagnostics(reads, batch.response_mask_NT, targets))
            if step <= args.warmup:
                continue
            record(("rollout (sampling)", "generated"), t_roll, gen_tokens, m_roll)
            record(("student + teacher no-grad passes", "prompt+response"), t_score, all_tokens, m_score)
            if seen is None:  # else the student's reads came from the sampler's logits: no student pass to time
                record(("- of which student", "prompt+response"), passes["student"], all_tokens, m_score)
            record(("- of which teacher", "prompt+response"), passes["teacher"], all_tokens, m_score)
            record(("support/rewards/advantages (core)", "generated"), t_sig, gen_tokens, m_sig)
            record(("update (fwd+bwd+AdamW)", "prompt+response"), t_upd, all_tokens, m_upd)
            record(("dynamics metrics", "generated"), t_diag, gen_tokens, m_diag)
            flops["update"].append((6 * _model_flops(s.student, all_tokens, gen_tokens, s.vocab_width), t_upd))
            teacher_flops = 2 * _model_flops(s.teacher, all_tokens, gen_tokens, s.vocab_width)
            flops["teacher pass"].append((teacher_flops, passes["teacher"]))
            record(
                ("whole step", "generated"),
                t_roll + t_score + t_sig + t_upd + t_diag,
                gen_tokens,
                max(m_roll, m_score, m_sig, m_upd, m_diag),
            )

        shapes = {
            role: _describe(shape, m)
            for role, shape, m in (("t", teacher_shape, s.teacher), ("s", student_shape, s.student))
        }
        vocab = s.student.get_output_embeddings().weight.shape[0]
    threads = torch.get_num_threads()
    print(
        f"\nOPD step, teacher {shapes['t']} -> student {shapes['s']}, random weights, vocab {vocab:,}, "
        f"{args.prompts} prompts x {args.n} samples x {args.max_resp} tokens, K={args.k} {args.strategy}, "
        f"{args.dtype}, device {device}"
        + (f" ({threads} threads)" if device.type == "cpu" else "")
        + f", mean of {args.steps} steps after {args.warmup} warm-up\n"
    )
    mem_label = "peak allocated MiB" if device.type == "cuda" else "peak RSS MiB (phase)"
    print(f"| phase | s / step | tokens / s | tokens counted | {mem_label} |")
    print("|---|---:|---:|---|---:|")
    for (name, counted), vals in rows.items():
        sec = sum(v[0] for v in vals) / len(vals)
        tok_s = sum(v[1] for v in vals) / max(sum(v[0] for v in vals), 1e-9)
        peak = max(v[2] for v in vals)
        print(f"| {name} | {sec:.4f} | {tok_s:,.0f} | {counted} | {peak:,.0f} |")
    peak_tflops = args.peak_tflops or _known_peak(device, args.dtype)
    print()
    for name, vals in flops.items():
        rate = sum(f for f, _ in vals) / max(sum(t for _, t in vals), 1e-9) / 1e12
        mfu = f", MFU {100 * rate / peak_tflops:.1f}% of {peak_tflops:g} TFLOP/s" if peak_tflops else ""
        print(f"{name}: {rate:.3f} model TFLOP/s{mfu}")
    return 0


def _model_flops(model, all_tokens: float, response_tokens: float, vocab_width: int | None) -> float:
    """Matmul parameter-token products of one pass: the body at every token, the output head (over the vocabulary
    the step reads) only at the response positions, which is where the step runs it."""
    head = model.get_output_embeddings().weight
    rows = vocab_width or head.shape[0]
    body = matmul_params(model) - head.numel()
    return body * all_tokens + rows * head.shape[1] * response_tokens


def _describe(shape: str, model) -> str:
    c = model.config
    return f"{shape} ({c.num_hidden_layers} layers, d={c.hidden_size})"


def _known_peak(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda" or dtype not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


if __name__ == "__main__":
    raise SystemExit(main())
