"""`opd eval grade` reporting: the incomplete-file warning in the table, --after-think, timeout/retry and
answer-source counts in grading_results.json."""

from __future__ import annotations

import json

from opd.eval import grade


def _write(path, rows, meta=None):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if meta is not None:
        path.with_name(path.name[: -len(".jsonl")] + ".meta.json").write_text(json.dumps(meta))


def test_incomplete_file_gets_a_warning_line_in_the_table(tmp_path, capsys):
    rows = [
        {"example_id": e, "sample_idx": j, "answer": "3", "response": "\\boxed{3}"}
        for e in range(7)
        for j in range(4 if e else 2)
    ]
    meta = {"benchmark": "toytest", "model": "m", "complete": False, "n_examples": 16, "settings_n": 4}
    _write(tmp_path / "toytest__m__t.jsonl", rows, meta)
    done = [{"example_id": 0, "sample_idx": j, "answer": "3", "response": "\\boxed{3}"} for j in range(4)]
    finished = {"benchmark": "other", "model": "m", "complete": True, "n_examples": 1}
    _write(tmp_path / "other__m__t.jsonl", done, finished)
    assert grade.main([str(tmp_path), "--no-progress", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "warning: toytest (m): incomplete, 7/16 problems, min 2 of 4 samples per problem" in out
    assert out.count("warning:") == 1
    res = json.loads((tmp_path / "grading_results.json").read_text())
    assert res[str(tmp_path / "toytest__m__t.jsonl")]["complete"] is False


def test_after_think_flag_and_counts(tmp_path):
    rows = [
        {"example_id": 0, "sample_idx": 0, "answer": "42", "response": "<think>\\boxed{42}</think> so \\boxed{41}"},
        {"example_id": 0, "sample_idx": 1, "answer": "42", "response": "<think>hmm</think> The answer is 42."},
        {"example_id": 0, "sample_idx": 2, "answer": "42", "response": "<think>\\boxed{42} and never closed"},
    ]
    _write(tmp_path / "b__m__t.jsonl", rows)
    out = tmp_path / "r.json"
    assert grade.main([str(tmp_path / "b__m__t.jsonl"), "--output", str(out), "--no-progress", "--after-think"]) == 0
    r = json.loads(out.read_text())[str(tmp_path / "b__m__t.jsonl")]
    assert r["mean_score"] == 1 / 3 and r["format_error_rollouts"] == 1
    assert r["answer_sources"] == {"boxed": 1, "sentence": 1, "unfinished_think": 1}
    assert r["grading_timeouts"] == 0 and r["grading_retries"] == 0
    # without the flag the box inside the unclosed think block counts
    assert grade.main([str(tmp_path / "b__m__t.jsonl"), "--output", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())[str(tmp_path / "b__m__t.jsonl")]["mean_score"] == 2 / 3
