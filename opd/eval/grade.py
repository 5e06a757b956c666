"""`opd eval grade`: grade generated answers and write grading_results.json plus a benchmark x model table.

Reads every ``*.jsonl`` in the given folders (or the given files) written by `opd eval gen` (any JSONL with
``example_id``, ``answer`` and ``response`` per line works; ``sample_idx`` and ``response_tokens`` are used
when present). Each response is graded by ``opd.grading`` (the same grader as the training reward; ``--after-think``
grades only what follows ``</think>``); the metrics per file are those of ``opd.eval.metrics``, plus
grading_timeouts (symbolic checks that timed out twice and graded wrong), grading_retries (checks that timed out
once and were retried with a longer budget), answer_sources (where the answers were found: box, Answer: line,
sentence, bare answer, none) and truncated_rollouts (samples that hit the token limit, from ``finish_reason``).
Settings come from the ``.meta.json`` beside each file; a file whose generation did not finish gets a warning line
under the table.
With ``--model-verifier`` a verifier LLM re-checks the rule failures (reported separately, see
``opd.eval.verifier``).

Example::

    opd eval grade eval_out --tokenizer ckpt/actor
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from opd.data.schema import DataError
from opd.eval.metrics import ExampleRollouts, file_metrics
from opd.eval.verifier import VERDICTS
from opd.io import atomic_write_text

__all__ = ["read_outputs", "grade_files", "format_table", "main"]

RESULTS_NAME = "grading_results.json"
DETAILS_SUFFIX = ".graded.jsonl"
_REQUIRED = ("example_id", "answer", "response")


def details_path(path: Path) -> Path:
    return path.with_name(path.name[: -len(".jsonl")] + DETAILS_SUFFIX)


def collect_files(paths: list[str]) -> list[Path]:
    """Generation files named directly or found (recursively) in folders; our own details files are skipped."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*.jsonl") if not f.name.startswith(".") and not f.name.endswith(DETAILS_SUFFIX)
            )
            if not found:
                raise DataError("folder holds no .jsonl files", file=p)
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError("no such file or folder", file=p)
    return files


def read_outputs(path: Path) -> list[dict]:
    """Records of one generation file; a truncated last line (a run still writing) is ignored with a warning."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not line.endswith("\n"):
                print(f"warning: {path}: ignoring truncated last line {lineno}", file=sys.stderr)
                break
            raise DataError(f"line {lineno}: invalid JSON ({e.msg})", file=path) from e
        for key in _REQUIRED:
            if key not in rec:
                raise DataError(f"line {lineno}: missing field {key!r} (need {', '.join(_REQUIRED)})", file=path)
        if not isinstance(rec["response"], str):
            raise DataError(f"line {lineno}: 'response' must be a string", file=path)
        records.append(rec)
    if not records:
        raise DataError("no records", file=path)
    return records


def _settings(path: Path) -> dict:
    meta = path.with_name(path.name[: -len(".jsonl")] + ".meta.json")
    if meta.exists():
        m = json.loads(meta.read_text(encoding="utf-8"))
        settings = {k[len("settings_") :]: v for k, v in m.items() if k.startswith("settings_")}
        return {
            "benchmark": m.get("benchmark"),
            "model": m.get("model"),
            "model_path": m.get("model_path"),
            "complete": m.get("complete"),
            "n_examples_expected": m.get("n_examples"),
            "settings": settings,
        }
    parts = path.stem.split("__")
    if len(parts) == 3:
        return {"benchmark": parts[0], "model": parts[1], "settings": {"tag": parts[2]}}
    return {"benchmark": path.stem, "model": "?", "settings": {}}


def _token_lengths(records: list[dict], tokenizer) -> list[int] | None:
    if tokenizer is not None:
        enc = tokenizer([r["response"] for r in records], add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in enc]
    if all(isinstance(r.get("response_tokens"), int) for r in records):
        return [r["response_tokens"] for r in records]
    return None


def _group(recs: list[dict], scores: list[float], extracted: list[str | None]) -> list[ExampleRollouts]:
    """Samples grouped per example (in sample order), as the metric functions take them."""
    groups: dict[str, ExampleRollouts] = defaultdict(lambda: ExampleRollouts([], [], []))
    order = sorted(range(len(recs)), key=lambda i: (str(recs[i]["example_id"]), recs[i].get("sample_idx", i)))
    for i in order:
        ex = groups[str(recs[i]["example_id"])]
        ex.scores.append(scores[i])
        ex.extracted.append(extracted[i])
        ex.responses.append(recs[i]["response"])
    return list(groups.values())


def _file_result(path: Path, recs: list[dict], grades: list, verdicts: list[str | None] | None, tokenizer) -> dict:
    extracted = [g.extracted for g in grades]
    res = {
        **_settings(path),
        **file_metrics(_group(recs, [g.score for g in grades], extracted), _token_lengths(recs, tokenizer)),
        "grading_timeouts": sum(g.method == "timeout" for g in grades),
        "grading_retries": sum(g.retried for g in grades),
        "answer_sources": dict(Counter(g.source for g in grades)),
        "truncated_rollouts": (
            sum(r.get("finish_reason") == "length" for r in recs) if all("finish_reason" in r for r in recs) else None
        ),
    }
    if verdicts is not None:  # the verifier can only turn a rule failure into a success
        scores = [float(g.score == 1.0 or v == "CORRECT") for g, v in zip(grades, verdicts)]
        mv = file_metrics(_group(recs, scores, extracted))
        asked = [v for v in verdicts if v is not None]
        res["verifier"] = {
            "checked": len(asked),
            **{v.lower(): asked.count(v) for v in VERDICTS},
            "mean_score": mv["mean_score"],
            "best_score": mv["best_score"],
            "maj_score": mv["maj_score"],
        }
    return res


def _write_details(path: Path, recs: list[dict], grades: list, verdicts: list[str | None] | None) -> None:
    lines = []
    for i, (r, g) in enumerate(zip(recs, grades)):
        row = {
            "example_id": r["example_id"],
            "sample_idx": r.get("sample_idx", i),
            "answer": r["answer"],
            "extracted": g.extracted,
            "score": g.score,
            "method": g.method,
            "source": g.source,
        }
        if verdicts is not None:
            row["verifier"] = verdicts[i]
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(details_path(path), "".join(lines))


def grade_files(
    files: list[Path],
    *,
    tokenizer=None,
    verifier=None,
    workers: int | None = None,
    timeout: float = 5.0,
    progress: bool = True,
    details: bool = False,
    after_think: bool = False,
) -> dict[str, dict]:
    """Grade every file; returns {file path: result object} (the content of grading_results.json).

    All files are graded in one batch (one pool of math-verify workers). ``details`` also writes
    ``<file>.graded.jsonl`` beside each input: per sample the extracted answer, the verdict and how it was
    reached (and the verifier's verdict), to inspect what the grader did. ``after_think`` grades only what
    follows ``</think>`` (an unclosed think block has no answer).
    """
    from opd.grading import grade_batch

    per_file = [read_outputs(f) for f in files]
    flat = [r for recs in per_file for r in recs]
    grades = grade_batch(
        [r["response"] for r in flat],
        [str(r["answer"]) for r in flat],
        workers=workers,
        timeout=timeout,
        progress=progress,
        only_after_think=after_think,
    )
    verdicts: list[str | None] | None = None
    if verifier is not None:
        fails = [i for i, g in enumerate(grades) if g.score == 0.0]
        items = [
            (str(flat[i].get("question") or flat[i].get("prompt", "")), str(flat[i]["answer"]), flat[i]["response"])
            for i in fails
        ]
        verdicts = [None] * len(flat)
        for i, v in zip(fails, verifier.judge(items) if items else []):
            verdicts[i] = v
    results: dict[str, dict] = {}
    offset = 0
    for path, recs in zip(files, per_file):
        span = slice(offset, offset + len(recs))
        v = verdicts[span] if verdicts is not None else None
        results[str(path)] = _file_result(path, recs, grades[span], v, tokenizer)
        if details:
            _write_details(path, recs, grades[span], v)
        offset += len(recs)
    return results


def format_table(results: dict[str, dict]) -> str:
    """Benchmarks as rows, models as columns; cells "mean@N / pass@N" in percent."""
    settings_per_model = defaultdict(set)
    for r in results.values():
        settings_per_model[r["model"]].add(json.dumps(r["settings"], sort_keys=True))
    cells: dict[tuple[str, str], str] = {}
    cols: list[str] = []
    rows: list[str] = []
    for path, r in results.items():
        col = r["model"]
        if len(settings_per_model[col]) > 1:  # one model sampled with several settings: one column each
            col = f"{col} [{Path(path).stem.split('__')[-1]}]"
        if col not in cols:
            cols.append(col)
        if r["benchmark"] not in rows:
            rows.append(r["benchmark"])
        n = r["samples_per_example"]["max"]
        cells[(r["benchmark"], col)] = f"{100 * r['mean_score']:.1f} / {100 * r['best_score']:.1f} (N={n})"
    head = ["benchmark  (mean@N / pass@N, %)", *cols]
    body = [[b, *(cells.get((b, c), "-") for c in cols)] for b in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*x) for x in body)]
    return "\n".join(lines + [w for w in map(_incomplete_warning, results.values()) if w])


def _incomplete_warning(r: dict) -> str | None:
    """One line for a file whose generation did not finish (its scores cover only part of the benchmark)."""
    if r.get("complete") is not False:
        return None
    want = r.get("n_examples_expected")
    n = r.get("settings", {}).get("n")
    problems = f"{r['n_examples']}/{want}" if want else str(r["n_examples"])
    per = f" of {n}" if n else ""
    model = f" ({r['model']})" if r.get("model") not in (None, "?") else ""
    return (
        f"warning: {r['benchmark']}{model}: incomplete, {problems} problems, "
        f"min {r['samples_per_example']['min']}{per} samples per problem"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd eval grade",
        description="Grade `opd eval gen` outputs (last group of \\boxed{}, else an Answer: line, an 'answer is' "
        "sentence or a bare answer; string, numeric and percent checks, then math-verify under a timeout) and write "
        "grading_results.json with mean@N, pass@N, maj@N and more per file. Policy: docs/workflow.md section 6.",
    )
    p.add_argument("paths", nargs="+", help="output folder(s) and/or JSONL file(s)")
    p.add_argument("--output", help=f"results file (default: <first folder>/{RESULTS_NAME}, or ./{RESULTS_NAME})")
    p.add_argument(
        "--tokenizer",
        help="tokenizer folder for avg_output_length (default: the response_tokens recorded by `opd eval gen`)",
    )
    p.add_argument("--model-verifier", help="verifier LLM folder: re-check rule failures (CORRECT/INCORRECT/INVALID)")
    p.add_argument(
        "--verifier-max-tokens",
        type=int,
        default=32,
        help="verifier output budget (default 32; raise it for a model that thinks before answering)",
    )
    p.add_argument(
        "--verifier-thinking",
        choices=["on", "off"],
        help="pass enable_thinking to the verifier's chat template (Qwen3-style models); default: not passed",
    )
    p.add_argument("--workers", type=int, help="math-verify worker processes (default: CPU count)")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds per symbolic check (default 5; one that runs past it is retried once with 4x the budget)",
    )
    p.add_argument(
        "--after-think",
        action="store_true",
        help="grade only what follows the last </think> (a response whose think block never closes has no answer)",
    )
    p.add_argument(
        "--details",
        action="store_true",
        help=f"also write <file>{DETAILS_SUFFIX} per input: extracted answer, verdict and method per sample",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print(f"opd eval grade: --timeout must be > 0, got {args.timeout}", file=sys.stderr)
        return 2
    files = collect_files(args.paths)
    tokenizer = None
    if args.tokenizer:
        from opd.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)  # a checkpoint folder's model/ too
    verifier = None
    if args.model_verifier:
        from opd.eval.verifier import ModelVerifier

        kwargs = {} if args.verifier_thinking is None else {"enable_thinking": args.verifier_thinking == "on"}
        verifier = ModelVerifier(args.model_verifier, max_new_tokens=args.verifier_max_tokens, template_kwargs=kwargs)
    results = grade_files(
        files,
        tokenizer=tokenizer,
        verifier=verifier,
        workers=args.workers,
        timeout=args.timeout,
        progress=not args.no_progress,
        details=args.details,
        after_think=args.after_think,
    )
    first_dir = next((Path(p) for p in args.paths if Path(p).is_dir()), None)
    out = Path(args.output) if args.output else (first_dir or Path(".")) / RESULTS_NAME
    atomic_write_text(out, json.dumps(results, indent=2))
    print(format_table(results))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
