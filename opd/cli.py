"""The one `opd` command: a thin dispatcher to subcommand modules.

Each subcommand lives in its own module exposing `main(argv: list[str] | None) -> int` with its own argparse, so
`opd <cmd> --help` costs only that module's imports (no torch import to print help for `opd eval grade`).
Every command fails the same way (`opd.errors`): one line naming the input and a non-zero exit status; `--debug`
(anywhere on the line) or OPD_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys

from opd.errors import DEBUG_FLAG, run_command

# (words) -> (module, one-line help). One table, read top to bottom by `opd --help`.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): (
        "opd.demo",
        "run the embedded end-to-end toy demo (SFT teacher, cold-start student, OPD, eval, report)",
    ),
    ("lab",): (
        "opd.lab.cli",
        "reproduce the paper's OPD phenomena on a toy world, with a pre-declared verdict for each (report)",
    ),
    ("train",): ("opd.engines.local.cli", "train with the local engine from a YAML file and/or launcher variables"),
    ("report",): ("opd.report", "draw the OPD dynamics report (markdown + PNG) from a run folder's metrics.jsonl"),
    ("eval", "gen"): ("opd.eval.gen", "generate N answers per benchmark problem"),
    ("eval", "grade"): ("opd.eval.grade", "grade generated answers and write grading_results.json"),
    ("data", "prepare"): ("opd.data.prepare", "convert prompt sets / benchmarks into the RL parquet schema"),
    ("data", "dedup"): ("opd.data.dedup", "remove questions of one prompt set that overlap another"),
    ("data", "export-llamafactory"): ("opd.data.llamafactory", "register rollouts as a LlamaFactory dataset"),
    ("rollout",): ("opd.data.rollout", "teacher rollouts with rejection sampling (SFT cold-start data)"),
    ("sft",): ("opd.sft.cli", "built-in SFT (assistant-token masking) for the cold start"),
    ("check",): (
        "opd.check",
        "pre-flight teacher/student compatibility check (overlap, top-1 agreement, reverse KL) on a prompt sample",
    ),
}


def _usage() -> str:
    lines = ["usage: opd <command> [args...]", "", "commands:"]
    for words, (_, text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<26} {text}")
    lines.append("\n`opd <command> --help` shows a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = [a for a in argv[:1] if a == DEBUG_FLAG]  # `opd --debug train ...`: handed on to the command
    argv = argv[len(flags) :]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            module_name, _ = COMMANDS[words]
            module = importlib.import_module(module_name)
            # the command's main is wrapped too (for `python -m`); wrapping here covers any that is not
            return run_command(f"opd {' '.join(words)}", module.main, argv[n:] + flags)
    print(f"opd: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
