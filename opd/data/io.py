"""Streaming readers for the data files OPD reads: parquet / JSON / JSONL inputs, and folders of them.

Atomic writes live in `opd.io` (shared by the engine, the report and the demo, not only the data tools).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from opd.data.schema import DataError

INPUT_SUFFIXES = (".parquet", ".jsonl", ".json")


def expand_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Files named directly, plus the parquet/JSON/JSONL files inside named folders (sorted, e.g. HF shards)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in INPUT_SUFFIXES)
            if not found:
                raise DataError(f"folder holds no {'/'.join(INPUT_SUFFIXES)} files", file=p)
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError("no such file or folder", file=p)
    return out


def iter_records(path: Path, columns: list[str] | None = None, batch_rows: int = 4096) -> Iterator[dict]:
    """Stream rows of one parquet / JSON / JSONL file as dicts (parquet in record batches, reading only `columns`).

    A `.json` file may hold a list of records, {"data"|"rows"|"train"|"test": [...]}, or (as many HF uploads do)
    one record per line.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"not a readable parquet file ({e})", file=path) from e
        names = pf.schema_arrow.names
        cols = None if columns is None else [c for c in columns if c in names]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            yield from batch.to_pylist()
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            head = f.read(1 << 16).lstrip()
        if suffix == ".json" and head.startswith("["):
            yield from _json_records(path)
        elif suffix == ".json" and head.startswith("{") and not _looks_like_jsonl(path):
            yield from _json_records(path)
        else:
            yield from _jsonl_records(path)
    else:
        raise DataError(f"unsupported file type {suffix!r}; expected one of {INPUT_SUFFIXES}", file=path)


_RECORD_LIST_KEYS = ("data", "rows", "train", "test")


def _looks_like_jsonl(path: Path) -> bool:
    """True when the first line is a whole JSON record, unless it is the only line and holds a list of records
    (a one-line {"data": [...]} file is JSON, not a one-record JSONL)."""
    with open(path, encoding="utf-8") as f:
        first = f.readline()
        more = any(line.strip() for line in f)
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False
    return more or not (isinstance(obj, dict) and any(isinstance(obj.get(k), list) for k in _RECORD_LIST_KEYS))


def _json_records(path: Path) -> Iterator[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON at line {e.lineno} ({e.msg})", file=path) from e
    if isinstance(data, dict):
        for key in _RECORD_LIST_KEYS:
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise DataError("a JSON object file must hold a list under 'data', 'rows', 'train' or 'test'", file=path)
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"expected a JSON object, got {type(rec).__name__}", file=path, row=i)
        yield rec


def _jsonl_records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        row = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON on line {lineno} ({e.msg})", file=path, row=row) from e
            if not isinstance(rec, dict):
                raise DataError(f"line {lineno}: expected a JSON object, got {type(rec).__name__}", file=path, row=row)
            yield rec
            row += 1
