"""Benchmark problems from local files: a path, or a name looked up in a local folder (never a download).

Two layouts are read: the RL schema (docs/workflow.md §1: `prompt` chat messages, `reward_model.ground_truth`,
`extra_info.index` as the example id) and plain problem/answer columns (`opd.data.schema.resolve_problem_columns`,
any case: AIME-style uploads; example id = row number), whose problems are wrapped in an instruction template
(default: the boxed suffix) as one user turn.
A name such as ``aime24`` resolves to ``<data-dir>/aime24.{parquet,jsonl,json}`` (case-insensitive).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opd.data.io import INPUT_SUFFIXES, iter_records
from opd.data.schema import PROBLEM_LAYOUT, DataError, cell_text, resolve_problem_columns, validate_rl_rows
from opd.data.templates import apply_template, load_template

__all__ = ["Example", "Benchmark", "resolve_benchmark", "load_benchmark"]


@dataclass(frozen=True)
class Example:
    example_id: int
    messages: list[dict]  # the chat prompt (one user turn), before the chat template
    answer: str


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: Path
    examples: list[Example]


def resolve_benchmark(spec: str, data_dir: str | Path | None = None) -> Path:
    """A benchmark file from a path, or from a name under ``data_dir``; the error lists what is available."""
    path = Path(spec)
    if path.is_file():
        return path
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError("--data-dir is not a folder", file=folder)
        found = [f for f in sorted(folder.iterdir()) if f.is_file() and f.suffix in INPUT_SUFFIXES]
        for f in found:
            if f.stem.lower() == spec.lower():
                return f
        names = ", ".join(f.stem for f in found) or "(no parquet/jsonl/json files)"
        raise DataError(f"benchmark {spec!r} is neither a file nor a name in {folder} (available: {names})")
    raise DataError(
        f"benchmark {spec!r} is not a file; pass a parquet/jsonl path or --data-dir holding {spec}.parquet "
        "(benchmarks are never downloaded)"
    )


def _text(value, file: Path, row: int, column: str) -> str:
    try:
        text = cell_text(value)
    except TypeError as e:
        raise DataError(str(e), file=file, row=row, column=column) from None
    if text is None:
        raise DataError("empty value", file=file, row=row, column=column)
    return text


def load_benchmark(spec: str, data_dir: str | Path | None = None, template: str = "boxed") -> Benchmark:
    """Read a benchmark's problems; ``template`` (name or file) wraps problem/answer-layout rows only."""
    path = resolve_benchmark(spec, data_dir)
    rows = list(iter_records(path))
    if not rows:
        raise DataError("benchmark has no rows", file=path)
    examples: list[Example] = []
    if "prompt" in rows[0] and "reward_model" in rows[0]:
        for r in rows:  # foreign files may lack these; fill them so the one validator applies
            if not isinstance(r.get("extra_info"), dict):
                r["extra_info"] = {}
        ids = [r["extra_info"].get("index") for r in rows]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            for i, r in enumerate(rows):  # absent or non-integer ids (e.g. hashes): the row number is the example id
                r["extra_info"]["index"] = i
        for r in rows:
            r.setdefault("data_source", path.stem)
            r.setdefault("ability", "math")
        validate_rl_rows(rows, path)
        examples = [
            Example(
                int(r["extra_info"]["index"]),
                [dict(m) for m in r["prompt"]],
                str(r["reward_model"]["ground_truth"]).strip(),
            )
            for r in rows
        ]
    else:
        pcol, acol = resolve_problem_columns(rows[0])
        if pcol is None or acol is None:
            raise DataError(
                f"columns {sorted(rows[0])} are neither the RL schema (prompt, reward_model) nor "
                f"problem/answer ({PROBLEM_LAYOUT})",
                file=path,
            )
        tmpl = load_template(template)
        for i, r in enumerate(rows):
            problem = _text(r.get(pcol), path, i, pcol)
            answer = _text(r.get(acol), path, i, acol)
            examples.append(Example(i, [{"role": "user", "content": apply_template(tmpl, problem)}], answer))
    return Benchmark(name=path.stem, path=path, examples=examples)
