"""`opd lab`: run the pre-declared experiments on the lab world and say, for each phenomenon, whether it reproduced.

    opd lab                  # 3 seeds, experiments (a)-(g): report in lab_out/report/report.md (~8 min, 2 cores)
    opd lab --quick          # 1 seed, experiments (a)-(c): the smoke run (~2 min)
    opd lab --seeds 3,4,5    # other judged seeds (the calibration seeds are refused)

Trained models, OPD runs and checks are cached in OUT by a hash of their settings, so a second run (or a `--quick`
after a full run) reuses what it can.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from opd.errors import check_writable, command, usage_errors


def measurements(results: dict[str, dict], seed: int, names: tuple[str, ...]) -> dict:
    """One seed's numbers as the criteria read them."""

    def acc(role: str) -> float:
        return results[f"sft:{role}"]["accuracy"]["what_is"]

    return {
        "seed": seed,
        "teachers": {p: acc(f"teacher_{p}") for p in ("columns", "partial")},
        "models": {"student": acc(f"student_s{seed}"), **({"peer": acc(f"peer_s{seed}")} if "peer" in names else {})},
        "runs": {p: results[f"opd:{p}_s{seed}"]["curves"] for p in names},
        "checks": {p: results[f"check:{p}_s{seed}"]["metrics"] for p in names},
        "check_accuracy": {p: results[f"check:{p}_s{seed}"]["student_accuracy"] for p in names},
    }


def setup_markdown(cfg, results: dict[str, dict], seconds: float) -> str:
    models = {k[4:]: v for k, v in results.items() if k.startswith("sft:")}
    lines = [
        "| model | accuracy, what_is | accuracy, sum_of | trained on |",
        "|---|---|---|---|",
    ]
    for name, r in models.items():
        lines.append(
            f"| {name} | {100 * r['accuracy']['what_is']:.1f}% | {100 * r['accuracy']['sum_of']:.1f}% | "
            f"{r['train_conversations']} conversations |"
        )
    knobs = ", ".join(f"{k}={v}" for k, v in asdict(cfg).items())
    return "\n".join(lines) + f"\n\nSettings: {knobs}.\n\nWall time: {seconds / 60:.1f} min."


def run(cfg, out: Path, quick: bool) -> dict:
    from tqdm import tqdm

    from opd.lab.criteria import PHENOMENA, QUICK
    from opd.lab.plan import ALL_PAIRS, QUICK_PAIRS, jobs, run_jobs, world_sizes
    from opd.lab.report import write_report
    from opd.lab.stages import build_world

    t0 = time.perf_counter()
    names = QUICK_PAIRS if quick else ALL_PAIRS
    build_world(out, cfg.world_seed, world_sizes(cfg))
    plan = jobs(cfg, out, names)
    with tqdm(total=len(plan), desc="opd lab", unit="job") as bar:

        def done(job) -> None:
            bar.set_postfix_str(f"{job.kind} {job.spec['name']}")
            bar.update()

        results = run_jobs(plan, out, cfg.workers, on_done=done)
    seeds = [measurements(results, s, names) for s in cfg.seeds]
    chosen = [ph for ph in PHENOMENA if (ph.key in QUICK) or not quick]
    judged = [(ph, ph.judge(seeds)) for ph in chosen]
    seconds = time.perf_counter() - t0
    title = f"opd lab ({'quick: ' if quick else ''}{len(cfg.seeds)} seed(s): {', '.join(map(str, cfg.seeds))})"
    path = write_report(out / "report", title, judged, seeds, setup_markdown(cfg, results, seconds))
    summary = {
        "report": str(path),
        "seconds": seconds,
        "verdicts": {ph.key: {"title": ph.title, "reproduced": v.reproduced, "numbers": v.numbers} for ph, v in judged},
        "seeds": seeds,
        "config": asdict(cfg),
    }
    from opd.io import atomic_write_text

    atomic_write_text(out / "report" / "summary.json", json.dumps(summary, indent=1))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd lab",
        description="Reproduce the paper's OPD phenomena (pattern compatibility, overlap dynamics, off-policy cold "
        "start, concentration, pre-flight prediction, no new knowledge, teacher-aligned prompts) on a toy world "
        "built on the spot, with a pre-declared criterion and an honest verdict for each.",
    )
    p.add_argument("--out", default="lab_out", help="lab folder: cached models and runs, report/ (default lab_out/)")
    p.add_argument(
        "--quick", action="store_true", help="one seed, experiments (a)-(c) only, half the OPD steps (about 2 minutes)"
    )
    p.add_argument("--seeds", default=None, help="comma-separated judged seeds (default 0,1,2)")
    p.add_argument("--workers", type=int, default=None, help="parallel job processes, one thread each (default 2)")
    p.add_argument("--tiny", action="store_true", help="seconds-long run of the machinery (nothing can reproduce)")
    return p


@command("opd lab")
def main(argv: list[str] | None = None) -> int:
    from opd.lab.config import LabConfig

    args = build_parser().parse_args(argv)
    with usage_errors():
        cfg = LabConfig()
        if args.seeds is not None:
            try:
                seeds = tuple(int(s) for s in args.seeds.split(","))
            except ValueError:
                raise ValueError(f"--seeds={args.seeds!r} is not valid; expected comma-separated integers") from None
            cfg = replace(cfg, seeds=seeds)
        if args.workers is not None:
            cfg = replace(cfg, workers=args.workers)
        if args.tiny:
            cfg = cfg.tiny()
        elif args.quick:
            cfg = cfg.quick()
    check_writable(args.out, "--out")  # refuse before minutes of training, not after
    summary = run(cfg, Path(args.out), quick=args.quick or args.tiny)
    print()
    for key, v in summary["verdicts"].items():
        print(f"({key}) {v['title']:<26} {'reproduced' if v['reproduced'] else 'NOT reproduced'}")
    print(f"\nreport: {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
