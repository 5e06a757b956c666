"""`opd data prepare`: convert local copies of public math prompt sets and benchmarks into the RL parquet schema.

Recognised layouts (`--format auto` picks one from the columns):
  dapo          DAPO-Math-17k parquet, already RL-shaped (prompt = [user message with the DAPO template],
                reward_model.ground_truth, extra_info.index); the raw problem is recovered by stripping the template.
  deepmath      DeepMath-103K: question, final_answer, difficulty, topic, r1_solution_1..3 (solutions not read).
  openthoughts  OpenThoughts3-1.2M: conversations [{from, value}], domain, source, difficulty; only domain == "math"
                rows are kept and the answer is the last \\boxed{} of the assistant ("gpt") turn.
  benchmark     AIME / AMC / MATH-500 style: problem|question and answer|final_answer|expected_answer|ground_truth|
                solution_answer in any case (the columns the trainer and `opd eval gen` read too), optional id column
                (id, ID, unique_id, problem_id, idx); MATH-500's subject/level are kept.
Each output row's prompt is the raw problem wrapped in --template (dapo, boxed, none, or a text file with one
{problem} placeholder); the raw problem stays in extra_info.question. Structurally malformed input (missing column,
wrong type) stops with an error naming the file, row and column; rows without usable content (empty question or
answer, non-math domain, no boxed answer, repeated question) are dropped and counted by reason.
Nothing is downloaded: inputs are local files or folders (e.g. a `huggingface-cli download` snapshot).

  opd data prepare --input DAPO-Math-17k/data --output data/dapo_boxed.parquet --template boxed
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opd.data.io import expand_inputs, iter_records
from opd.data.schema import (
    ANSWER_COLUMNS,
    PROBLEM_COLUMNS,
    DataError,
    cell_text,
    make_rl_row,
    resolve_problem_columns,
    write_rl_parquet,
)
from opd.data.templates import apply_template, load_template, strip_template
from opd.errors import command, usage_errors

ID_COLUMNS = ("id", "ID", "unique_id", "problem_id", "idx")


class Drop(Exception):
    """A row without usable content: dropped and counted, not an error."""


@dataclass(frozen=True)
class Converted:
    question: str
    answer: str
    extra: dict[str, Any]
    note: str | None = None  # kept, but worth reporting (e.g. no known template to strip)


@dataclass(frozen=True)
class Format:
    name: str
    default_source: str
    columns: tuple[str, ...] | None  # parquet columns to read (None = all)
    convert: Callable[[dict, Path, int], Converted]


def _text(rec: dict, col: str, file: Path, row: int, *, what: str) -> str:
    """A string cell (`opd.data.schema.cell_text`: integers such as AIME answers become their decimal text);
    null/NaN/blank -> Drop. A question must be text: a number there is a broken column, not a problem statement."""
    if col not in rec:
        raise DataError("missing column", file=file, row=row, column=col)
    value = rec[col]
    if what == "question" and value is not None and not isinstance(value, str) and value == value:  # NaN: empty
        raise DataError(
            f"expected a string, got {type(value).__name__} {str(value)[:60]!r}", file=file, row=row, column=col
        )
    try:
        v = cell_text(rec[col])
    except TypeError as e:
        raise DataError(str(e), file=file, row=row, column=col) from None
    if v is None:
        raise Drop(f"empty {what}")
    return v


def _scalar_extras(rec: dict, cols: tuple[str, ...]) -> dict[str, Any]:
    return {c: rec[c] for c in cols if isinstance(rec.get(c), (str, int, float)) and not isinstance(rec.get(c), bool)}


def _convert_dapo(rec: dict, file: Path, row: int) -> Converted:
    prompt = rec.get("prompt")
    if "prompt" not in rec:
        raise DataError("missing column", file=file, row=row, column="prompt")
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(m, dict) for m in prompt):
        raise DataError(
            f"expected a list of chat messages, got {type(prompt).__name__}", file=file, row=row, column="prompt"
        )
    users = [m for m in prompt if m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str):
        raise DataError("no user message with string content", file=file, row=row, column="prompt")
    content = users[-1]["content"]
    question = strip_template(content, normalize=False)
    if not question:
        raise Drop("empty question")
    note = "no known template found: the whole prompt is taken as the question" if question == content.strip() else None
    rm = rec.get("reward_model")
    if "reward_model" not in rec:
        raise DataError("missing column", file=file, row=row, column="reward_model")
    if not isinstance(rm, dict) or "ground_truth" not in rm:
        raise DataError(
            f"expected {{'ground_truth': ...}}, got {rm!r}"[:120], file=file, row=row, column="reward_model"
        )
    answer = _text(
        {"reward_model.ground_truth": rm["ground_truth"]}, "reward_model.ground_truth", file, row, what="answer"
    )
    info = rec.get("extra_info") if isinstance(rec.get("extra_info"), dict) else {}
    extra = {"source_id": str(info["index"])} if info.get("index") is not None else {}
    return Converted(question, answer, extra, note)


def _convert_deepmath(rec: dict, file: Path, row: int) -> Converted:
    q = _text(rec, "question", file, row, what="question")
    a = _text(rec, "final_answer", file, row, what="answer")
    return Converted(q, a, _scalar_extras(rec, ("difficulty", "topic")))


def _convert_openthoughts(rec: dict, file: Path, row: int) -> Converted:
    from opd.grading.extract import extract_boxed

    if "domain" in rec and rec["domain"] != "math":
        raise Drop("domain is not math")
    conv = rec.get("conversations")
    if "conversations" not in rec:
        raise DataError("missing column", file=file, row=row, column="conversations")
    if not isinstance(conv, (list, tuple)) or not all(
        isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv
    ):
        raise DataError("expected a list of {from, value} turns", file=file, row=row, column="conversations")
    human = [t["value"] for t in conv if t.get("from") in ("human", "user")]
    gpt = [t["value"] for t in conv if t.get("from") in ("gpt", "assistant")]
    if not human or not human[0].strip():
        raise Drop("empty question")
    answer = extract_boxed(gpt[-1]) if gpt else None
    if not answer:
        raise Drop("no \\boxed answer in the assistant turn")
    return Converted(human[0].strip(), answer, _scalar_extras(rec, ("source", "difficulty")))


def _convert_benchmark(rec: dict, file: Path, row: int) -> Converted:
    qcol, acol = resolve_problem_columns(rec)
    for col, kind, names in ((qcol, "question", PROBLEM_COLUMNS), (acol, "answer", ANSWER_COLUMNS)):
        if col is None:
            raise DataError(
                f"no {kind} column; expected one of {list(names)} (any case), found {sorted(rec)}", file=file, row=row
            )
    q = _text(rec, qcol, file, row, what="question")
    a = _text(rec, acol, file, row, what="answer")
    extra = _scalar_extras(rec, ("subject", "level"))
    for c in ID_COLUMNS:
        if rec.get(c) is not None:
            extra["source_id"] = str(rec[c])
            break
    return Converted(q, a, extra)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("dapo", "DAPO-Math-17k", ("prompt", "reward_model", "extra_info"), _convert_dapo),
        Format("deepmath", "DeepMath-103K", ("question", "final_answer", "difficulty", "topic"), _convert_deepmath),
        Format(
            "openthoughts",
            "OpenThoughts3-math",
            ("conversations", "domain", "source", "difficulty"),
            _convert_openthoughts,
        ),
        Format("benchmark", "", None, _convert_benchmark),
    )
}


def detect_format(columns: list[str], file: Path) -> Format:
    cols = set(columns)
    if {"prompt", "reward_model"} <= cols:
        return FORMATS["dapo"]
    if "conversations" in cols:
        return FORMATS["openthoughts"]
    if {"question", "final_answer"} <= cols:
        return FORMATS["deepmath"]
    if None not in resolve_problem_columns(cols):
        return FORMATS["benchmark"]
    raise DataError(
        f"cannot tell the layout from columns {sorted(cols)}; pass --format ({', '.join(FORMATS)})", file=file
    )


def _columns_of(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).schema_arrow.names
        except Exception as e:
            raise DataError(f"not a readable parquet file ({e})", file=path) from e
    for rec in iter_records(path):
        return list(rec)
    return []


def _harmonise_extras(rows: list[dict]) -> None:
    """Turn an extra_info key into text when inputs disagree on its type (e.g. level 2 vs "Level 3"): one parquet
    column holds one type."""
    kinds: dict[str, set[str]] = collections.defaultdict(set)
    for r in rows:
        for k, v in r["extra_info"].items():
            kinds[k].add("number" if isinstance(v, (int, float)) else type(v).__name__)
    for k, ks in kinds.items():
        if len(ks) > 1:
            for r in rows:
                if k in r["extra_info"]:
                    r["extra_info"][k] = str(r["extra_info"][k])


@dataclass
class PrepareResult:
    rows: list[dict]
    read: int
    dropped: dict[str, int]
    formats: dict[str, str]  # file -> format name
    notes: dict[str, int] = dataclasses.field(default_factory=dict)  # kept rows worth a look, by reason


def convert_files(
    paths: list[Path],
    *,
    fmt: str = "auto",
    template: str,
    data_source: str | None = None,
    split: str = "train",
    dedup_questions: bool = True,
    limit: int | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Convert every input file into schema rows (indices 0..n-1 in input order)."""
    from tqdm.auto import tqdm

    rows: list[dict] = []
    dropped: collections.Counter[str] = collections.Counter()
    notes: collections.Counter[str] = collections.Counter()
    formats: dict[str, str] = {}
    seen: set[str] = set()
    read = 0
    bar = tqdm(desc="prepare", unit="row", disable=not progress)
    try:
        for path in paths:
            if fmt == "auto":
                columns = _columns_of(path)
                if not columns:  # an empty JSON/JSONL file: say so, not "cannot tell the layout from columns []"
                    raise DataError("the file has no rows", file=path)
                f = detect_format(columns, path)
            elif fmt in FORMATS:
                f = FORMATS[fmt]
            else:
                raise ValueError(f"unknown --format {fmt!r}; choose auto or one of {sorted(FORMATS)}")
            formats[str(path)] = f.name
            source = data_source or f.default_source or path.stem
            for i, rec in enumerate(iter_records(path, list(f.columns) if f.columns else None)):
                read += 1
                bar.update(1)
                try:
                    c = f.convert(rec, path, i)
                    key = re.sub(r"\s+", " ", c.question).strip()
                    if dedup_questions and key in seen:
                        raise Drop("repeated question")
                    seen.add(key)
                except Drop as d:
                    dropped[str(d)] += 1
                    continue
                if c.note:
                    notes[c.note] += 1
                rows.append(
                    make_rl_row(
                        data_source=source,
                        prompt_text=apply_template(template, c.question),
                        ground_truth=c.answer,
                        index=len(rows),
                        split=split,
                        question=c.question,
                        extra=c.extra,
                    )
                )
                if limit is not None and len(rows) >= limit:
                    break
            if limit is not None and len(rows) >= limit:
                break
    finally:
        bar.close()
    _harmonise_extras(rows)
    return PrepareResult(rows, read, dict(dropped), formats, dict(notes))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd data prepare",
        description=__doc__.split("\n\n")[0]
        + " Inputs are local parquet/JSON/JSONL files or folders of them; nothing is downloaded.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    p.add_argument("--input", nargs="+", required=True, help="input files or folders (parquet, JSON, JSONL)")
    p.add_argument("--output", required=True, help="output RL parquet (written atomically)")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="input layout (default: detect)")
    p.add_argument(
        "--template", default="boxed", help="dapo, boxed, none, or a text file with one {problem} (default boxed)"
    )
    p.add_argument("--data-source", help="data_source value (default: the layout's dataset name, or the file stem)")
    p.add_argument("--split", default="train", help="extra_info.split value (default train)")
    p.add_argument(
        "--keep-repeats", action="store_true", help="keep repeated questions (DAPO-Math-17k repeats each ~100x)"
    )
    p.add_argument("--limit", type=int, help="stop after this many kept rows")
    p.add_argument("--no-progress", action="store_true")
    return p


@command("opd data prepare")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with usage_errors():
        template = load_template(args.template)
    res = convert_files(
        expand_inputs(args.input),
        fmt=args.format,
        template=template,
        data_source=args.data_source,
        split=args.split,
        dedup_questions=not args.keep_repeats,
        limit=args.limit,
        progress=not args.no_progress,
    )
    if not res.rows:
        what = "no rows" if not res.read else f"no usable rows (dropped: {res.dropped})"
        raise DataError(what, file=args.input[0] if len(args.input) == 1 else ", ".join(args.input))
    write_rl_parquet(res.rows, args.output)
    print(
        json.dumps(
            {
                "output": args.output,
                "read": res.read,
                "kept": len(res.rows),
                "dropped": res.dropped,
                "notes": res.notes,
                "formats": res.formats,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
