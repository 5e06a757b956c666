"""The RL parquet schema (verl layout) that every OPD prompt set is stored in, with one validator for everyone.

A row: `data_source` (str), `prompt` (one user chat message, template already applied), `ability` (str),
`reward_model` ({"ground_truth": str, "style": "rule"}), `extra_info` (dict with at least `index`, `split` and the
raw `question`, i.e. the problem without the instruction template). Readers (trainer, rollout, dedup, eval) call
`read_rl_parquet`, which returns plain Python dicts and raises `DataError` naming the file, row and column of the
first problem, so a bad file never gets half-way through a run. Writers call `write_rl_parquet`, which writes a
temporary file and renames it, so a crash never leaves a truncated parquet behind.

Plain problem/answer files (AIME, AMC, MATH-500 uploads) are read by the trainer (TRAIN_DATASET / TEST_FILE),
`opd eval gen` and `opd data prepare` alike: `resolve_problem_columns` names their columns and `cell_text` reads a
cell, so a file one tool accepts the others accept too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from opd.io import atomic_path

RL_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")
PROBLEM_COLUMNS = ("problem", "question")  # in order of preference, matched in any case
ANSWER_COLUMNS = ("answer", "final_answer", "expected_answer", "ground_truth", "solution_answer")
PROBLEM_LAYOUT = f"{'/'.join(PROBLEM_COLUMNS)} + {'/'.join(ANSWER_COLUMNS)} columns, any case"


class DataError(ValueError):
    """Bad input data; the message names the file, row (0-based) and column when they are known."""

    def __init__(
        self, message: str, *, file: str | os.PathLike | None = None, row: int | None = None, column: str | None = None
    ):
        where = []
        if file is not None:
            where.append(f"file {str(file)!r}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.file, self.row, self.column = file, row, column


def resolve_problem_columns(columns) -> tuple[str | None, str | None]:
    """The (problem, answer) columns of a plain problem/answer file as spelled in `columns` (any case: AIME uploads
    write Problem/Answer), None for a role no column fills; the first name of PROBLEM_COLUMNS / ANSWER_COLUMNS wins."""
    by_lower: dict[str, str] = {}
    for c in columns:
        if c == c.lower() or c.lower() not in by_lower:  # the all-lowercase spelling wins a clash
            by_lower[c.lower()] = c
    problem = next((by_lower[n] for n in PROBLEM_COLUMNS if n in by_lower), None)
    answer = next((by_lower[n] for n in ANSWER_COLUMNS if n in by_lower), None)
    return problem, answer


def cell_text(value) -> str | None:
    """A problem or answer cell as stripped text, None when empty (null, NaN, blank). Integers stored as floats by
    pandas (AIME answers: 33.0) lose the `.0`, so the ground truth reads as written. TypeError for a value that is
    neither a string nor a number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"expected a string, got {type(value).__name__} {str(value)[:60]!r}")
    if isinstance(value, float):
        if value != value:  # NaN: pandas' empty cell
            return None
        value = int(value) if value.is_integer() else value
    return str(value).strip() or None


def make_rl_row(
    *,
    data_source: str,
    prompt_text: str,
    ground_truth: str,
    index: int,
    split: str,
    question: str,
    ability: str = "math",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One schema row; `extra` keys (e.g. difficulty, source id) are added to extra_info."""
    info: dict[str, Any] = {"index": int(index), "split": split, "question": question}
    if extra:
        clash = set(extra) & set(info)
        if clash:
            raise ValueError(f"extra_info keys {sorted(clash)} are reserved")
        info.update(extra)
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": prompt_text}],
        "ability": ability,
        "reward_model": {"ground_truth": ground_truth, "style": "rule"},
        "extra_info": info,
    }


def _check_row(row: dict, file, i: int) -> None:
    for col in RL_COLUMNS:
        if col not in row:
            raise DataError("missing column", file=file, row=i, column=col)
    for col in ("data_source", "ability"):
        if not isinstance(row[col], str) or not row[col]:
            raise DataError(f"expected a non-empty string, got {row[col]!r}", file=file, row=i, column=col)
    prompt = row["prompt"]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise DataError(
            f"expected a non-empty list of chat messages, got {type(prompt).__name__}",
            file=file,
            row=i,
            column="prompt",
        )
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(
                f"each message needs string 'role' and 'content', got {m!r}", file=file, row=i, column="prompt"
            )
    if prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        raise DataError("the last message must be a non-empty user turn", file=file, row=i, column="prompt")
    rm = row["reward_model"]
    if not isinstance(rm, dict) or not isinstance(rm.get("ground_truth"), str) or not rm["ground_truth"].strip():
        raise DataError(
            f"expected {{'ground_truth': non-empty str, 'style': ...}}, got {rm!r}",
            file=file,
            row=i,
            column="reward_model",
        )
    info = row["extra_info"]
    if not isinstance(info, dict):
        raise DataError(f"expected a dict, got {type(info).__name__}", file=file, row=i, column="extra_info")
    if not isinstance(info.get("index"), int) or isinstance(info.get("index"), bool):
        raise DataError(
            f"extra_info.index must be an integer, got {info.get('index')!r}", file=file, row=i, column="extra_info"
        )


def validate_rl_rows(rows: list[dict], file: str | os.PathLike | None = None) -> None:
    """Raise DataError at the first row that does not follow the schema (indices within one file must be unique)."""
    seen: dict[int, int] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"expected a dict row, got {type(row).__name__}", file=file, row=i)
        _check_row(row, file, i)
        idx = row["extra_info"]["index"]
        if idx in seen:
            raise DataError(
                f"extra_info.index {idx} already used by row {seen[idx]}", file=file, row=i, column="extra_info"
            )
        seen[idx] = i


def read_rl_parquet(path: str | os.PathLike) -> list[dict]:
    """Read and validate an RL parquet into plain dicts (pyarrow, so nested columns come back as lists/dicts); a file
    with no rows is an error, since every reader needs at least one prompt."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", file=path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for non-parquet input
        raise DataError(f"not a readable parquet file ({e})", file=path) from e
    missing = [c for c in RL_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(
            f"missing column(s) {missing}; expected the RL schema {list(RL_COLUMNS)} (convert with `opd data prepare`)",
            file=path,
            column=missing[0],
        )
    if table.num_rows == 0:  # said plainly, not left to a later "no usable prompt" (an all-duplicates dedup output)
        raise DataError("the file has no rows", file=path)
    rows = table.to_pylist()
    for row in rows:  # pyarrow fills absent struct fields with None; drop them so extra_info keys stay as written
        if isinstance(row.get("extra_info"), dict):
            row["extra_info"] = {k: v for k, v in row["extra_info"].items() if v is not None}
    validate_rl_rows(rows, path)
    return rows


def write_rl_parquet(rows: list[dict], path: str | os.PathLike) -> None:
    """Validate, then write atomically (temporary file in the same folder + os.replace)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    validate_rl_rows(rows, path)
    try:
        table = pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.null()) for c in RL_COLUMNS})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(
            f"rows disagree on a value's type, which one parquet column cannot hold ({e})", file=path
        ) from e
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def user_text(row: dict) -> str:
    """The (templated) user prompt of a schema row."""
    return row["prompt"][-1]["content"]


def raw_question(row: dict) -> str | None:
    """The raw question kept in extra_info (None when a foreign file lacks it)."""
    q = row.get("extra_info", {}).get("question")
    return q if isinstance(q, str) and q.strip() else None
