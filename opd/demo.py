"""`opd demo`: the embedded end-to-end OPD demo on a toy world that needs no download (2 CPU cores, minutes).

Stages, each timed (wall seconds in summary.json):
  1. world    a locally trained BPE tokenizer with a chat template; 3-digit addition problems as RL parquet
              (train / dev / test, disjoint, from the seed);
  2. teacher  a 3-layer Llama-style model trained by SFT on gold step-by-step answers (`opd.sft`);
  3. student  a 2-layer model cold-started off-policy on teacher rollouts (the paper's recipe), stopped when its
              greedy dev accuracy first reaches a target: its SFT curve is so steep that a fixed step count lands
              anywhere, and a student that is confidently wrong gets almost no reverse-KL signal (docs/demo.md);
  4. opd      on-policy distillation teacher -> student with the local engine (`opd.engines.local.train`): top-k
              (K=16, only_stu, student_p, plus a tail-bucket slot) token rewards; held-out test accuracy (greedy)
              every `test_freq` steps;
  5. report   `opd.report` plots of the run's metrics plus before/after figures -> report/report.md and
              summary.json (accuracy before/after OPD, overlap ratio at the first/last step, stage seconds).

What it shows and what it does not: OPD lifts a weak student towards its teacher. In this toy, plain SFT on free
gold answers is the cheaper way to the same accuracy; the demo is a working, inspectable OPD pipeline, not a claim
that OPD beats SFT when perfect labels are free.

    opd demo                       # default seed 0, writes demo_out/
    opd demo --seed 1 --out demo_seed1
    opd demo --tiny                # seconds-long smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from opd.errors import command, usage_errors
from opd.presets import PRESETS

STAGE_DIRS = ("data", "tokenizer", "teacher", "student_cold", "opd", "report")
_TOY_OPD = PRESETS["toy_opd"]


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    arch: str = "llama"
    teacher_size: str = "teacher"
    student_size: str = "student"
    # data
    n_train: int = 25600  # teacher SFT (1.25 epochs at the defaults) and OPD prompts (150 x 32) come from here
    n_dev: int = 200  # cold-start stopping rule
    n_test: int = 500  # accuracy before / after OPD, and the accuracy curve during OPD
    # teacher SFT: measured on 3-digit addition, 3 layers x 64 reached 98% dev accuracy by step 664 of 1000 (seeds
    # 0 and 1); on 4 digits a 700-step schedule stopped at 44% (the learning curve jumps late, so keep the margin)
    teacher_steps: int = 1000
    teacher_lr: float = 3e-3
    teacher_batch: int = 32
    # student cold start on teacher rollouts, stopped at a dev accuracy target
    cold_rollouts: int = 8192
    cold_lr: float = 3e-3
    cold_batch: int = 64
    cold_max_steps: int = 1500
    cold_eval_every: int = 10
    cold_target: float = 0.25
    # OPD (local engine): the preset toy_opd (opd/presets.py notes the measurements behind each value); these knobs
    # exist so that --tiny and the command line can change it
    opd_steps: int = _TOY_OPD["total_steps"]
    opd_lr: float = _TOY_OPD["lr"]
    opd_prompts: int = _TOY_OPD["mini_batch_size"]
    opd_n: int = _TOY_OPD["n_responses"]
    top_k: int = _TOY_OPD["algo.top_k"]
    tail_bucket: bool = _TOY_OPD["algo.tail_bucket"]  # the tail-bucket support slot (dropped when top_k is 0)
    test_freq: int = _TOY_OPD["test_freq"]
    max_resp_length: int = _TOY_OPD["max_resp_length"]  # training and validation response tokens

    def __post_init__(self) -> None:
        positive = (
            "n_train",
            "n_dev",
            "n_test",
            "teacher_steps",
            "teacher_batch",
            "cold_batch",
            "cold_rollouts",
            "cold_max_steps",
            "cold_eval_every",
            "opd_steps",
            "opd_prompts",
            "opd_n",
            "test_freq",
            "max_resp_length",
        )
        for name in positive:
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)!r} is not valid; expected an int >= 1")
        for name in ("teacher_lr", "cold_lr", "opd_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)!r} is not valid; expected > 0")
        if not 0 < self.cold_target:
            raise ValueError(f"DemoConfig.cold_target={self.cold_target!r} is not valid; expected a dev accuracy > 0")
        if self.cold_rollouts > self.n_train or self.opd_prompts > self.n_train:
            raise ValueError(
                f"DemoConfig: cold_rollouts={self.cold_rollouts} and opd_prompts={self.opd_prompts} "
                f"must not exceed n_train={self.n_train}"
            )

    @classmethod
    def tiny(cls, **changes) -> "DemoConfig":
        """A seconds-long run of every stage (smoke tests): tiny models, a handful of steps."""
        small = dict(
            teacher_size="tiny",
            student_size="tiny",
            n_train=256,
            n_dev=16,
            n_test=16,
            teacher_steps=6,
            teacher_batch=16,
            cold_batch=16,
            cold_rollouts=32,
            cold_max_steps=4,
            cold_eval_every=2,
            cold_target=1.01,
            opd_steps=2,
            opd_prompts=4,
            opd_n=2,
            top_k=4,
            test_freq=1,
            max_resp_length=16,
        )
        return replace(cls(), **{**small, **changes})


def _log(msg: str) -> None:
    print(f"[opd demo] {msg}", flush=True)


def _write_json(path: Path, obj) -> None:
    from opd.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1))


def stage_world(cfg: DemoConfig, out: Path):
    from opd.toy import build_toy_tokenizer, make_splits, rl_rows
    from opd.toy.task import write_parquet

    tok = build_toy_tokenizer(out / "tokenizer")
    splits = make_splits(cfg.seed, cfg.n_train, cfg.n_dev, cfg.n_test)
    paths = {s: write_parquet(rl_rows(p, s), out / "data" / f"{s}.parquet") for s, p in splits.items()}
    return tok, splits, paths


def teacher_settings(cfg: DemoConfig) -> dict:
    """What a saved teacher must match to be reused (`--reuse-teacher`): its world, its size and its training."""
    from opd.toy.models import SIZES
    from opd.toy.task import N_DIGITS

    keys = ("seed", "arch", "teacher_size", "n_train", "teacher_steps", "teacher_lr", "teacher_batch")
    return {**{k: getattr(cfg, k) for k in keys}, "n_digits": N_DIGITS, "teacher_dims": list(SIZES[cfg.teacher_size])}


def stage_teacher(cfg: DemoConfig, out: Path, tok, splits) -> dict:
    from opd.sft.trainer import SFTConfig, encode_dataset, train_sft
    from opd.toy import build_tiny_model, save_model, sft_messages
    from opd.toy.evaluate import accuracy

    model = build_tiny_model(tok, cfg.teacher_size, seed=cfg.seed * 7 + 1, arch=cfg.arch)
    data = encode_dataset(tok, [r["messages"] for r in sft_messages(splits["train"])], max_length=256)
    logs = train_sft(
        model,
        data,
        SFTConfig(
            lr=cfg.teacher_lr,
            steps=cfg.teacher_steps,
            batch_size=cfg.teacher_batch,
            warmup_ratio=0.05,
            seed=cfg.seed,
            log_every=50,
        ),
        pad_token_id=tok.pad_token_id,
    )
    acc = accuracy(model, tok, splits["test"])
    save_model(model, tok, out / "teacher")
    info = {
        "test_accuracy": acc["accuracy"],
        "steps": logs[-1]["step"],
        "final_loss": logs[-1]["loss"],
        "settings": teacher_settings(cfg),
    }
    _write_json(out / "teacher" / "demo_teacher.json", info)
    return info


def teacher_rollouts(teacher, tok, problems, seed: int) -> tuple[list[list[dict]], dict]:
    """Teacher samples (temperature 1) as SFT conversations; samples without a \\boxed answer are rejected."""
    from opd.toy.evaluate import sample_responses

    responses = sample_responses(teacher, tok, problems, temperature=1.0, seed=seed, batch_size=512, progress=True)
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    kept = [p.messages() + [{"role": "assistant", "content": t}] for p, t in zip(problems, texts) if "\\boxed" in t]
    return kept, {"rollouts": len(problems), "kept": len(kept), "rejected_no_box": len(problems) - len(kept)}


def stage_student(cfg: DemoConfig, out: Path, tok, splits) -> dict:
    from opd.sft.trainer import SFTConfig, encode_dataset, train_sft
    from opd.toy import build_tiny_model, load_model, save_model
    from opd.toy.evaluate import accuracy

    teacher, _ = load_model(out / "teacher")
    convs, stats = teacher_rollouts(teacher, tok, splits["train"][: cfg.cold_rollouts], seed=cfg.seed)
    del teacher
    data = encode_dataset(tok, convs, max_length=256)
    model = build_tiny_model(tok, cfg.student_size, seed=cfg.seed * 7 + 2, arch=cfg.arch)
    dev = splits["dev"]
    logs = train_sft(
        model,
        data,
        SFTConfig(
            lr=cfg.cold_lr,
            steps=cfg.cold_max_steps,
            batch_size=cfg.cold_batch,
            warmup_ratio=0.05,
            seed=cfg.seed + 1,
            log_every=50,
            eval_every=cfg.cold_eval_every,
            stop_metric="accuracy",
            stop_threshold=cfg.cold_target,
        ),
        pad_token_id=tok.pad_token_id,
        evaluate=lambda m, step: accuracy(m, tok, dev),
    )
    save_model(model, tok, out / "student_cold")
    evals = [r for r in logs if "accuracy" in r]
    return {
        **stats,
        "steps": logs[-1]["step"],
        "stopped_early": bool(logs[-1].get("stopped_early")),
        "dev_accuracy": evals[-1]["accuracy"] if evals else None,
        "dev_curve": [(r["step"], r["accuracy"]) for r in evals],
    }


def opd_train_config(cfg: DemoConfig, out: Path, paths: dict):
    """The OPD stage: the preset toy_opd with this run's knobs (the preset's own unless --tiny or a flag changed them),
    paths and seed; one checkpoint, at the end."""
    from opd.engines.local.config import resolve

    return resolve(
        None,
        {
            **_TOY_OPD,
            "total_steps": cfg.opd_steps,
            "lr": cfg.opd_lr,
            "mini_batch_size": cfg.opd_prompts,
            "n_responses": cfg.opd_n,
            "test_freq": cfg.test_freq,
            "max_resp_length": cfg.max_resp_length,
            "max_val_resp_length": cfg.max_resp_length,
            "algo.top_k": cfg.top_k,
            "algo.tail_bucket": cfg.tail_bucket and cfg.top_k > 0,
            "actor_model_path": str(out / "student_cold"),
            "reward_model_path": str(out / "teacher"),
            "train_dataset": str(paths["train"]),
            "test_files": [str(paths["test"])],
            "save_freq": cfg.opd_steps,
            "seed": cfg.seed,
            "output_dir": str(out),
            "run_name": "opd",
            "resume": "off",
        },
    )


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


def build_summary(cfg: DemoConfig, rows: list[dict], teacher: dict, student: dict, seconds: dict) -> dict:
    """The machine-readable outcome, read straight from the OPD run's metrics.jsonl."""
    val_key = next(k for r in rows for k in r if k.startswith("val/") and k.endswith("/mean@1") and k != "val/mean@1")
    acc = _series(rows, val_key)
    overlap = _series(rows, "opd/overlap_ratio")
    first_last = {}
    for key in (
        "opd/overlap_ratio",
        "opd/top1_agreement",
        "opd/reverse_kl",
        "opd/overlap_mass_student",
        "opd/overlap_mass_teacher",
        "opd/entropy/gap",
        "train/true_reward",
    ):
        s = _series(rows, key)
        if s:
            first_last[key] = {"first": s[0][1], "last": s[-1][1], "first_step": s[0][0], "last_step": s[-1][0]}
    return {
        "seed": cfg.seed,
        "accuracy_metric": f"{val_key} (greedy, {cfg.n_test} held-out test problems)",
        "teacher_accuracy": teacher["test_accuracy"],
        "accuracy_before_opd": acc[0][1],
        "accuracy_after_opd": acc[-1][1],
        "accuracy_gain_points": 100 * (acc[-1][1] - acc[0][1]),
        "accuracy_curve": acc,
        "overlap_ratio_first_step": overlap[0][1] if overlap else None,
        "overlap_ratio_last_step": overlap[-1][1] if overlap else None,
        "first_last": first_last,
        "cold_start": student,
        "wall_seconds": seconds,
        "config": asdict(cfg),
    }


def table(summary: dict) -> str:
    fl = summary["first_last"]
    rows = [("student accuracy (test, greedy)", summary["accuracy_before_opd"], summary["accuracy_after_opd"])]
    for key, label in (
        ("opd/overlap_ratio", "top-k overlap ratio"),
        ("opd/top1_agreement", "top-1 agreement"),
        ("opd/reverse_kl", "per-token reverse KL"),
        ("train/true_reward", "rollout reward"),
    ):
        if key in fl:
            rows.append((label, fl[key]["first"], fl[key]["last"]))
    lines = ["| | before OPD (step 0; dynamics: first step) | after OPD (last step) |", "|---|---|---|"]
    lines += [f"| {name} | {a:.3f} | {b:.3f} |" for name, a, b in rows]
    lines.append(f"| teacher accuracy (test, greedy) | {summary['teacher_accuracy']:.3f} | |")
    secs = summary["wall_seconds"]
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in secs.items()]
    return "\n".join(lines)


def run(cfg: DemoConfig, out: str | os.PathLike, reuse_teacher: bool = False) -> dict:
    from opd.engines.local import train
    from opd.engines.local.logging import read_metrics
    from opd.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in STAGE_DIRS:  # nothing from an earlier run leaks into this one (except a reused teacher)
        if name == "teacher" and reuse_teacher:
            continue
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "summary.json").unlink(missing_ok=True)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    tok, splits, paths = stage_world(cfg, out)
    seconds["world"] = time.perf_counter() - t
    _log(f"world: tokenizer {len(tok)} tokens; {', '.join(f'{k} {len(v)}' for k, v in splits.items())} problems")

    t = time.perf_counter()
    marker = out / "teacher" / "demo_teacher.json"
    teacher = json.loads(marker.read_text()) if reuse_teacher and marker.is_file() else None
    settings = teacher_settings(cfg)
    if teacher is not None and teacher.get("settings") != settings:
        _log("teacher: saved teacher was trained with other settings; training a new one")
        teacher = None
    if teacher is None:
        shutil.rmtree(out / "teacher", ignore_errors=True)
        teacher = stage_teacher(cfg, out, tok, splits)
    else:
        _log("teacher: reusing the saved teacher (--reuse-teacher)")
    seconds["teacher_sft"] = time.perf_counter() - t
    _log(f"teacher: test accuracy {teacher['test_accuracy']:.3f} ({seconds['teacher_sft']:.0f} s)")

    t = time.perf_counter()
    student = stage_student(cfg, out, tok, splits)
    seconds["student_cold_start"] = time.perf_counter() - t
    _log(
        f"student cold start: {student['steps']} steps, dev accuracy {student['dev_accuracy']} "
        f"({seconds['student_cold_start']:.0f} s)"
    )

    t = time.perf_counter()
    run_dir = train(opd_train_config(cfg, out, paths))
    seconds["opd"] = time.perf_counter() - t
    rows = read_metrics(run_dir)

    t = time.perf_counter()
    summary = build_summary(cfg, rows, teacher, student, seconds)  # `seconds` is shared: later stages land in it
    write_report(
        run_dir,
        out / "report",
        title=f"OPD toy demo (seed {cfg.seed})",
        extra_markdown="## Before / after OPD\n\n" + table(summary) + "\n\n(Report drawing time and the "
        "total are in summary.json.)",
    )
    seconds["report"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_all
    _write_json(out / "summary.json", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="opd demo",
        description="Embedded end-to-end OPD demo on a toy task (3-digit addition), no download: teacher SFT, "
        "student cold start, OPD with the local engine, evaluation, report (markdown + PNG + summary.json).",
    )
    p.add_argument(
        "--out", default="demo_out", help="output folder (default demo_out/); earlier stage outputs in it are replaced"
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed for data, models and sampling (default {d.seed})")
    p.add_argument("--arch", choices=("llama", "qwen2"), default=d.arch, help="tiny model architecture")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tiny models, a few steps)")
    p.add_argument(
        "--reuse-teacher", action="store_true", help="reuse OUT/teacher if it was trained with the same settings"
    )
    p.add_argument("--teacher-steps", type=int, default=None, help=f"teacher SFT steps (default {d.teacher_steps})")
    p.add_argument(
        "--cold-target",
        type=float,
        default=None,
        help=f"stop the student's cold start at this dev accuracy (default {d.cold_target})",
    )
    p.add_argument("--opd-steps", type=int, default=None, help=f"OPD steps (default {d.opd_steps})")
    p.add_argument("--opd-lr", type=float, default=None, help=f"OPD learning rate (default {d.opd_lr})")
    p.add_argument(
        "--top-k", type=int, default=None, help=f"LOG_PROB_TOP_K for OPD (default {d.top_k}; 0 = sampled token)"
    )
    p.add_argument(
        "--tail-bucket",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"add the tail-bucket support slot (default {d.tail_bucket})",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    return p


@command("opd demo")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    overrides = {
        name: value
        for name, value in (
            ("seed", args.seed),
            ("arch", args.arch),
            ("teacher_steps", args.teacher_steps),
            ("cold_target", args.cold_target),
            ("opd_steps", args.opd_steps),
            ("opd_lr", args.opd_lr),
            ("top_k", args.top_k),
            ("tail_bucket", args.tail_bucket),
        )
        if value is not None
    }
    with usage_errors():
        cfg = DemoConfig.tiny(**overrides) if args.tiny else replace(DemoConfig(), **overrides)
    summary = run(cfg, args.out, reuse_teacher=args.reuse_teacher)
    print()
    print(table(summary))
    print(f"\nreport: {Path(args.out) / 'report' / 'report.md'}   summary: {Path(args.out) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
