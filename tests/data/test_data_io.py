"""Atomic writes: all or nothing, and the finished file gets the mode an ordinary open() would give it."""

import stat

import pytest

from opd.io import atomic_path, atomic_write_text, json_safe


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_replaces_and_respects_umask(tmp_path, monkeypatch, umask, mode):
    import opd.io as io_mod

    monkeypatch.setattr(io_mod, "_UMASK", umask)  # the module reads the process umask once, at import
    target = tmp_path / "out" / "a.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello"
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "b.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["b.txt"]


def test_json_safe_nulls_every_non_finite_float():
    import json

    value = {"a": float("nan"), "b": [1.0, float("inf"), (float("-inf"), 2)], "c": "nan", "d": None, "e": 3}
    assert json_safe(value) == {"a": None, "b": [1.0, None, [None, 2]], "c": "nan", "d": None, "e": 3}
    assert json.loads(json.dumps(json_safe(value), allow_nan=False))["b"][2] == [None, 2]


@pytest.mark.parametrize("layout", ["list", "list_pretty", "data_one_line", "data_pretty", "jsonl_as_json", "jsonl"])
def test_iter_records_reads_every_json_layout(tmp_path, layout):
    import json

    from opd.data.io import iter_records

    recs = [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": "4"}]
    text = {
        "list": json.dumps(recs),
        "list_pretty": json.dumps(recs, indent=2),
        "data_one_line": json.dumps({"data": recs}),
        "data_pretty": json.dumps({"train": recs}, indent=1),
        "jsonl_as_json": "".join(json.dumps(r) + "\n" for r in recs),
        "jsonl": "".join(json.dumps(r) + "\n" for r in recs),
    }[layout]
    path = tmp_path / ("x.jsonl" if layout == "jsonl" else "x.json")
    path.write_text(text)
    assert list(iter_records(path)) == recs
    # a one-record JSONL saved as .json stays one record
    path.write_text(json.dumps(recs[0]) + "\n")
    assert list(iter_records(path)) == [recs[0]]
