"""`opd check`: a pre-flight teacher/student compatibility check on a prompt sample, before any training.

    opd check --student STUDENT_DIR --teacher TEACHER_DIR --data train.parquet --n-prompts 64 --json check.json

Why: OPD works only when teacher and student share compatible thinking patterns, and the overlap at the start
predicts the outcome (docs/algorithm.md §7). This command does the first half of one OPD step: the student answers
a seeded sample of prompts, both models score those answers without gradient, and it prints the dynamics
diagnostics the trainer would log at step 1 (overlap ratio and masses, top-1 agreement, per-token reverse KL,
entropies), the student's rule-reward accuracy, and the same numbers over position windows (early vs late tokens:
does the teacher's supervision decay along the response?). Optionally all of it goes to a JSON file.

Nothing is re-implemented: vocabularies, prompts, rollouts and the no-grad passes are the local engine's
(`opd.engines.local`), every number is `opd.core.metrics`. Reverse KL is the k1 estimate log p - log q at the
sampled token (the trainer's `opd/reverse_kl` for K > 0), an unbiased estimate of the per-token reverse KL.

The interpretation is deliberately cautious: a few thresholds (THRESHOLDS, printed with the verdict) flag patterns
that the paper and our toy demo associate with failing OPD. They are heuristics, not guarantees: in the toy demo
(docs/demo.md) the failed seed started with the same top-1 agreement and reverse KL as the successful ones.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields

from opd.errors import check_writable, command, usage_errors

# Heuristic thresholds of the verdict (documented in docs/local_engine.md, "Pre-flight check"; printed with it).
THRESHOLDS: dict[str, float] = {
    "top1_agreement_low": 0.5,  # below: teacher and student disagree on most of the student's own top-1 tokens
    "top1_agreement_caution": 0.8,  # below: frequent disagreement
    "reverse_kl_high": 1.0,  # nats/token above which the teacher finds the student's choices unlikely
    "overlap_mass_student_low": 0.5,  # student mass inside the shared top-k below this, with the next one:
    "overlap_ratio_low": 0.5,  # ... and this little top-k overlap: the two models favour different tokens
    "teacher_entropy_peaked": 0.05,  # nats: a teacher this peaked makes the top-k overlap ratio uninformative
    "indistinguishable_reverse_kl": 0.01,  # with top-1 agreement above the next value: no signal to distil
    "indistinguishable_top1": 0.99,
    "decay_top1_drop": 0.15,  # last window's top-1 agreement this much below the first's: supervision decays
    "truncated_high": 0.2,  # fraction of responses cut at --max-resp-length
}

# (key in opd.core.metrics, label) in print order
METRICS: tuple[tuple[str, str], ...] = (
    ("overlap_ratio", "top-k overlap ratio |S∩T|/K"),
    ("overlap_mass_student", "overlap mass, student p"),
    ("overlap_mass_teacher", "overlap mass, teacher q"),
    ("top1_agreement", "top-1 agreement"),
    ("reverse_kl", "reverse KL, k1 (nats/token)"),
    ("entropy/student", "entropy, student (nats)"),
    ("entropy/teacher", "entropy, teacher (nats)"),
    ("entropy/gap", "entropy gap, teacher - student"),
)


@dataclass(frozen=True)
class CheckSettings:
    """Every knob of the check, validated here (errors name the command-line flag)."""

    student: str
    teacher: str
    data: str
    n_prompts: int = 64
    n: int = 1
    k: int = 16
    max_resp_length: int = 512
    max_prompt_length: int = 1024
    temperature: float = 1.0
    teacher_temperature: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"
    enable_thinking: bool | None = None
    position_edges: tuple[int, ...] | None = None  # None: four equal windows over the longest response
    micro_batch_tokens: int = 16384
    batch_size: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        for flag, value in (
            ("--n-prompts", self.n_prompts),
            ("--n", self.n),
            ("--k", self.k),
            ("--max-resp-length", self.max_resp_length),
            ("--max-prompt-length", self.max_prompt_length),
            ("--micro-batch-tokens", self.micro_batch_tokens),
            ("--batch-size", self.batch_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{flag}={value!r} is not valid; expected an integer >= 1")
        for flag, value in (("--temperature", self.temperature), ("--teacher-temperature", self.teacher_temperature)):
            if not value > 0:
                raise ValueError(f"{flag}={value!r} is not valid; expected > 0")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--dtype={self.dtype!r} is not valid; allowed: fp32, bf16, fp16")
        if self.position_edges is not None:
            edges = list(self.position_edges)
            if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
                raise ValueError(
                    f"--position-edges={','.join(map(str, edges))!r} is not valid; expected increasing "
                    f"integers starting at 0, e.g. 0,256,1024"
                )


def auto_edges(longest: int) -> list[int]:
    """Four equal position windows over the longest response (fewer when responses are shorter than 4 tokens)."""
    width = max(1, math.ceil(longest / 4))
    return sorted({min(i * width, max(longest - 1, 0)) for i in range(4)})


def pick_prompts(n_available: int, n_prompts: int, seed: int) -> list[int]:
    """A seeded sample of prompt indices (all of them when fewer are available), in file order."""
    import numpy as np

    if n_prompts >= n_available:
        return list(range(n_available))
    return sorted(np.random.default_rng(seed).choice(n_available, size=n_prompts, replace=False).tolist())


def measure(
    student,
    teacher,
    batch,
    *,
    k: int,
    temperature: float,
    teacher_temperature: float = 1.0,
    position_edges: list[int] | None = None,
    vocab_size: int | None = None,
    token_budget: int = 16384,
    profile_bins: int = 64,
) -> dict:
    """The dynamics diagnostics of the student's rollouts `batch` (a local-engine RolloutBatch) under both models.

    Returns {"metrics": {name: mean over all response tokens}, "windows": [{name, first, last, tokens, metrics}],
    "position_edges": [...], "profile": per-position means (binned)}.
    """
    from opd.core.config import OPDConfig
    from opd.core.metrics import window_name  # the core's key format
    from opd.core.step import step_diagnostics, step_profile
    from opd.engines.local.scoring import score

    cfg = OPDConfig(top_k=k, temperature=temperature, teacher_temperature=teacher_temperature)
    reads = score(student, teacher, batch, cfg, token_budget=token_budget, vocab_size=vocab_size)
    mask_NT = batch.response_mask_NT
    longest = int(mask_NT.sum(-1).max())
    edges = list(position_edges) if position_edges is not None else auto_edges(longest)
    flat = step_diagnostics(reads, mask_NT, position_edges=edges, prefix="")
    names = [key for key, _ in METRICS]
    tokens_T = (mask_NT > 0).sum(0).tolist()
    windows = []
    for lo, hi in zip(edges, [*edges[1:], None]):
        tag = window_name(lo, hi)
        tokens = int(sum(tokens_T[lo:hi]))
        if tokens:
            windows.append(
                {
                    "name": tag[4:],
                    "first": lo,
                    "last": (hi - 1) if hi is not None else None,
                    "tokens": tokens,
                    "metrics": {m: flat[f"{tag}/{m}"] for m in names},
                }
            )
    profile = step_profile(reads, mask_NT, bin_size=max(1, math.ceil(longest / profile_bins)))
    return {"metrics": {m: flat[m] for m in names}, "windows": windows, "position_edges": edges, "profile": profile}


def interpret(
    metrics: dict[str, float], windows: list[dict], *, accuracy: float, truncated: float, k: int
) -> list[dict]:
    """Flags [{code, level: warn|caution|note, message}] from the THRESHOLDS heuristics; [] when nothing stands out."""
    th, flags = THRESHOLDS, []

    def flag(code: str, level: str, message: str) -> None:
        flags.append({"code": code, "level": level, "message": message})

    top1, rkl, mass = metrics["top1_agreement"], metrics["reverse_kl"], metrics["overlap_mass_student"]
    if top1 < th["top1_agreement_low"]:
        flag(
            "low_top1",
            "warn",
            f"teacher and student disagree on most of the student's own top-1 tokens (top-1 "
            f"agreement {top1:.3f} < {th['top1_agreement_low']}): the teacher is likely to pull the student "
            f"towards a different way of answering",
        )
    elif top1 < th["top1_agreement_caution"]:
        flag(
            "low_top1",
            "caution",
            f"teacher and student often disagree on the student's top-1 token (top-1 "
            f"agreement {top1:.3f} < {th['top1_agreement_caution']})",
        )
    if rkl > th["reverse_kl_high"]:
        flag(
            "high_reverse_kl",
            "warn",
            f"the teacher assigns low probability to the student's choices (reverse KL "
            f"{rkl:.3f} > {th['reverse_kl_high']} nats/token)",
        )
    # a flat student has little mass in any top-k, so low mass alone is no disagreement: require a low overlap too
    if mass < th["overlap_mass_student_low"] and metrics["overlap_ratio"] < th["overlap_ratio_low"]:
        flag(
            "low_overlap_mass",
            "warn",
            f"the two top-{k} sets share few tokens and little of the student's "
            f"probability (overlap ratio {metrics['overlap_ratio']:.3f} < {th['overlap_ratio_low']}, overlap mass "
            f"{mass:.3f} < {th['overlap_mass_student_low']})",
        )
    if rkl < th["indistinguishable_reverse_kl"] and top1 > th["indistinguishable_top1"]:
        flag(
            "indistinguishable",
            "warn",
            f"teacher and student are nearly indistinguishable on the student's own "
            f"answers (reverse KL {rkl:.4f} < {th['indistinguishable_reverse_kl']}, top-1 agreement {top1:.3f} > "
            f"{th['indistinguishable_top1']}): OPD has little signal to distil",
        )
    if metrics["entropy/teacher"] < th["teacher_entropy_peaked"]:
        flag(
            "peaked_teacher",
            "note",
            f"the teacher is nearly deterministic (entropy "
            f"{metrics['entropy/teacher']:.4f} < {th['teacher_entropy_peaked']} nats): its top-{k} beyond the first "
            f"token is an arbitrary order of near-zero probabilities, so read top-1 agreement and reverse KL, not "
            f"the overlap ratio",
        )
    if len(windows) >= 2:
        first, last = windows[0]["metrics"], windows[-1]["metrics"]
        where = f"positions {windows[0]['name']} vs {windows[-1]['name']}"
        drop = first["top1_agreement"] - last["top1_agreement"]
        if drop > th["decay_top1_drop"]:
            flag(
                "decay",
                "caution",
                f"agreement decays along the response: top-1 agreement "
                f"{first['top1_agreement']:.3f} vs {last['top1_agreement']:.3f} at {where} "
                f"(drop {drop:.3f} > {th['decay_top1_drop']})",
            )
        elif last["reverse_kl"] > th["reverse_kl_high"] >= first["reverse_kl"]:
            flag(
                "decay",
                "caution",
                f"the teacher disagrees late in the response: reverse KL "
                f"{first['reverse_kl']:.3f} vs {last['reverse_kl']:.3f} at {where} (late > {th['reverse_kl_high']})",
            )
    if accuracy >= 1.0:
        flag(
            "solved",
            "note",
            "the student already answers every sampled prompt correctly: these prompts leave "
            "the teacher little to teach",
        )
    if truncated > th["truncated_high"]:
        flag(
            "truncated",
            "note",
            f"{truncated:.0%} of the responses hit --max-resp-length without EOS: the numbers "
            f"cover only their first tokens",
        )
    return flags


INCOMPATIBLE = ("low_top1", "high_reverse_kl", "low_overlap_mass")  # flags that say "the teacher's pattern differs"


def verdict(flags: list[dict]) -> str:
    warned = {f["code"] for f in flags if f["level"] == "warn"}
    if warned & set(INCOMPATIBLE):
        return (
            "OPD is at risk with this pair on these prompts (see the warnings); consider a cold start (SFT on "
            "teacher answers) or teacher-aligned prompts first"
        )
    if "indistinguishable" in warned:
        return (
            "little to distil: on these prompts the teacher is not measurably different from the student; a "
            "stronger or different teacher, or harder prompts, are needed"
        )
    if any(f["level"] == "caution" for f in flags):
        return "no strong red flag, but see the cautions"
    return "no red flag on these heuristics"


def run_check(s: CheckSettings) -> dict:
    """Load both models (after the vocabulary check), roll out the student on a prompt sample, measure, interpret."""
    import torch

    from opd.engines.local.data import load_prompt_set
    from opd.engines.local.rollout import generate
    from opd.models import load_pair, open_pair, resolve_device

    folders = open_pair(s.student, s.teacher, names=("--student", "--teacher"))  # fails before any weights load
    tokenizer, vocab_width = folders.tokenizer, folders.vocab_width
    template_kwargs = {} if s.enable_thinking is None else {"enable_thinking": s.enable_thinking}
    prompt_set = load_prompt_set(
        s.data, tokenizer, max_prompt_length=s.max_prompt_length, template_kwargs=template_kwargs
    )
    chosen = [prompt_set.problems[i] for i in pick_prompts(len(prompt_set.problems), s.n_prompts, s.seed)]

    torch.manual_seed(s.seed)
    device = resolve_device(s.device)
    pair = load_pair(folders, device=device, dtype=s.dtype, trainable=False, top_k=s.k, top_k_name="--k")
    student, teacher, eos_ids, pad_id = pair.student, pair.teacher, pair.eos_ids, pair.pad_id
    rollouts = generate(
        student,
        tokenizer,
        [p.prompt_ids for p in chosen],
        [p.ground_truth for p in chosen],
        n=s.n,
        max_new_tokens=s.max_resp_length,
        temperature=s.temperature,
        top_p=1.0,
        repetition_penalty=1.0,
        generator=torch.Generator(device=device).manual_seed(s.seed),
        batch_size=s.batch_size,
        eos_ids=eos_ids,
        pad_id=pad_id,
        progress=s.progress,
    )
    batch = rollouts.batch.to(device)
    result = measure(
        student,
        teacher,
        batch,
        k=s.k,
        temperature=s.temperature,
        teacher_temperature=s.teacher_temperature,
        position_edges=s.position_edges,
        vocab_size=vocab_width,
        token_budget=s.micro_batch_tokens,
    )
    lengths = batch.response_mask_NT.sum(-1)
    n_rows = len(rollouts.scores)
    sample = {
        "prompts": len(chosen),
        "prompts_available": len(prompt_set.problems),
        "prompts_dropped_too_long": prompt_set.dropped_too_long,
        "rollouts": n_rows,
        "response_tokens": int(lengths.sum()),
        "response_length_mean": float(lengths.float().mean()),
        "truncated_fraction": sum(rollouts.truncated) / n_rows,
        "student_accuracy": sum(rollouts.scores) / n_rows,
        "format_ok": sum(e is not None for e in rollouts.extracted) / n_rows,
    }
    flags = interpret(
        result["metrics"],
        result["windows"],
        accuracy=sample["student_accuracy"],
        truncated=sample["truncated_fraction"],
        k=s.k,
    )
    settings = asdict(s)
    settings["position_edges"] = result["position_edges"]
    return {
        "settings": settings,
        "sample": sample,
        **result,
        "thresholds": dict(THRESHOLDS),
        "flags": flags,
        "verdict": verdict(flags),
    }


def format_report(report: dict) -> str:
    """The printed table: one row per metric, columns = all tokens, then each position window."""
    s, sample = report["settings"], report["sample"]
    lines = [
        f"opd check: student {s['student']}  vs  teacher {s['teacher']}",
        f"  sample: {sample['prompts']} prompts x {s['n']} from {s['data']} (seed {s['seed']}), "
        f"{sample['rollouts']} rollouts, {sample['response_tokens']} response tokens, mean length "
        f"{sample['response_length_mean']:.1f}, truncated {sample['truncated_fraction']:.1%}",
        f"  student rule-reward accuracy: {sample['student_accuracy']:.4f}   (answer found: {sample['format_ok']:.1%})",
        f"  top-k width K = {s['k']}, temperature {s['temperature']}, teacher temperature {s['teacher_temperature']}",
        "",
    ]
    cols = [("all", report["metrics"])] + [(w["name"], w["metrics"]) for w in report["windows"]]
    label_w = max(len(label) for _, label in METRICS)
    col_w = max(10, *(len(name) + 1 for name, _ in cols))
    lines.append(f"{'metric':<{label_w}} " + "".join(f"{name:>{col_w}}" for name, _ in cols))
    for key, label in METRICS:
        lines.append(f"{label:<{label_w}} " + "".join(f"{values[key]:>{col_w}.4f}" for _, values in cols))
    tokens = [sample["response_tokens"]] + [w["tokens"] for w in report["windows"]]
    lines.append(f"{'tokens':<{label_w}} " + "".join(f"{t:>{col_w}d}" for t in tokens))
    lines.append("")
    lines.append("interpretation (heuristic thresholds, not guarantees; see docs/local_engine.md):")
    for f in report["flags"]:
        lines.append(f"  [{f['level']}] {f['message']}")
    lines.append(f"  verdict: {report['verdict']}")
    lines.append("  thresholds: " + ", ".join(f"{k}={v}" for k, v in report["thresholds"].items()))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    d = CheckSettings("", "", "")
    p = argparse.ArgumentParser(
        prog="opd check",
        description="Pre-flight teacher/student compatibility check: the student answers a seeded sample of "
        "prompts, both models score the answers (no gradient), and the OPD dynamics diagnostics of that first step "
        "are printed: top-k overlap ratio and masses, top-1 agreement, per-token reverse KL (k1 at the sampled "
        "token), entropies and their gap, the student's rule-reward accuracy, and the same metrics over position "
        "windows. A short interpretation flags likely failure with documented heuristic thresholds.",
        epilog="Models are local Hugging Face folders that must share one vocabulary (nothing is downloaded). "
        "Exit status: 0 when the check ran (whatever the verdict), 1 on an error (e.g. vocabulary mismatch), 2 on "
        "bad arguments.",
    )
    p.add_argument("--student", required=True, help="student model folder")
    p.add_argument("--teacher", required=True, help="teacher model folder (same tokenizer as the student)")
    p.add_argument("--data", required=True, help="RL parquet (docs/workflow.md §1) or a problem/answer parquet")
    p.add_argument(
        "--n-prompts", type=int, default=d.n_prompts, help="prompts sampled from --data (default %(default)s)"
    )
    p.add_argument("--n", type=int, default=d.n, help="student answers per prompt (default %(default)s)")
    p.add_argument("--k", type=int, default=d.k, help="top-k width of the overlap metrics (default %(default)s)")
    p.add_argument(
        "--max-resp-length", type=int, default=d.max_resp_length, help="response token limit (default %(default)s)"
    )
    p.add_argument(
        "--max-prompt-length",
        type=int,
        default=d.max_prompt_length,
        help="longer prompts are skipped (default %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help="student sampling and scoring temperature, as TEMPERATURE in training (default %(default)s)",
    )
    p.add_argument(
        "--teacher-temperature",
        type=float,
        default=d.teacher_temperature,
        help="as TEACHER_TEMPERATURE in training (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="prompt sample and sampling seed (default %(default)s)")
    p.add_argument("--device", default=d.device, help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=d.dtype, choices=("fp32", "bf16", "fp16"), help="both models' dtype")
    p.add_argument(
        "--enable-thinking",
        choices=("true", "false"),
        default=None,
        help="chat-template switch passed to the template (Qwen3-style); omitted: not passed",
    )
    p.add_argument(
        "--position-edges",
        default=None,
        metavar="0,A,B,...",
        help="first positions of the position windows (default: four equal windows over the longest response)",
    )
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=d.micro_batch_tokens,
        help="token budget of one scoring forward (default %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per sampler call")
    p.add_argument("--json", metavar="OUT.json", help="also write everything (with per-position profiles) here")
    p.add_argument("--no-progress", action="store_true", help="hide the sampling progress bar")
    return p


@command("opd check")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with usage_errors():
        edges = None
        if args.position_edges is not None:
            try:
                edges = tuple(int(x) for x in args.position_edges.split(","))
            except ValueError:
                raise ValueError(
                    f"--position-edges={args.position_edges!r} is not valid; expected comma-separated "
                    f"integers, e.g. 0,256,1024"
                ) from None
        # every other field is the flag of the same name
        parsed = {
            "enable_thinking": None if args.enable_thinking is None else args.enable_thinking == "true",
            "position_edges": edges,
            "progress": not args.no_progress,
        }
        settings = CheckSettings(
            **{f.name: parsed[f.name] if f.name in parsed else getattr(args, f.name) for f in fields(CheckSettings)}
        )
    if args.json:
        check_writable(args.json, "--json")  # before the models load and sample
    report = run_check(settings)
    print(format_report(report))
    if args.json:
        from opd.io import atomic_write_text, json_safe

        # NaN (a profile bin with no population) -> null, so the file is strict JSON
        atomic_write_text(args.json, json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
