"""Metrics (pure functions), grading of hand-written output files, the verifier's plumbing and benchmark loading."""

from __future__ import annotations

import json

import pytest

from opd.data.schema import DataError
from opd.eval import grade
from opd.eval.benchmarks import load_benchmark, resolve_benchmark
from opd.eval.metrics import ExampleRollouts, answer_key, distinct_ngram_ratio, file_metrics, majority_index
from opd.eval.verifier import build_prompt, parse_verdict


def test_majority_groups_equal_values_and_breaks_ties_by_first_seen():
    assert majority_index(["\\frac{1}{2}", "3", "0.5", "3"]) == 0  # 1/2 and 0.5 are one answer (2 votes), seen first
    assert majority_index(["3", "4", "4", "3"]) == 0
    assert majority_index([None, "4", None]) == 1
    assert majority_index([None, None]) is None
    assert answer_key("\\dfrac{2}{4}") == answer_key("0.5")
    assert answer_key("x+1") != answer_key("x+2")


def test_distinct_ngram_ratio_by_hand():
    # words: "a b c d e" -> 2 grams (abcd, bcde); "a b c d" -> 1 gram (abcd): 2 distinct / 3 total
    assert distinct_ngram_ratio(["a b c d e", "a b c d"]) == pytest.approx(2 / 3)
    assert distinct_ngram_ratio(["a b", ""]) is None


def test_file_metrics_by_hand():
    exs = [
        ExampleRollouts([1.0, 0.0, 1.0], ["5", "6", "5"], ["w x y z", "w x y z", "q"]),  # maj 5 correct
        ExampleRollouts([0.0, 0.0, 1.0], ["6", "6", "7"], ["a b c d e", "", ""]),  # maj 6 wrong
        ExampleRollouts([0.0, 0.0, 0.0], [None, None, "2"], ["", "", ""]),  # maj 2 (only answer) wrong
        ExampleRollouts([1.0, 1.0], ["1", "1"], ["", ""]),  # 2 samples only
    ]
    m = file_metrics(exs, lengths=[10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110])
    assert m["mean_score"] == pytest.approx((2 / 3 + 1 / 3 + 0 + 1) / 4)
    assert m["best_score"] == pytest.approx(3 / 4)
    assert m["maj_score"] == pytest.approx(2 / 4)
    assert (m["solve_none"], m["solve_all"]) == (1, 1)
    assert m["format_error_rollouts"] == 2
    assert m["avg_output_length"] == pytest.approx(60.0)
    assert m["distinct_4gram"] == pytest.approx((1 / 2 + 2 / 2) / 2)  # examples 1 and 2 have 4-grams
    assert m["n_rollouts"] == 11 and m["samples_per_example"] == {"min": 2, "max": 3}
    assert file_metrics(exs)["avg_output_length"] is None


def _write(path, recs, raw_tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + raw_tail)


HAND = [  # example 0: right, wrong, right (worded box); example 1: no answer, wrong; example 2: symbolic right
    {"example_id": 0, "sample_idx": 0, "answer": "12", "response": "so \\boxed{12}"},
    {"example_id": 0, "sample_idx": 1, "answer": "12", "response": "\\boxed{13}"},
    {"example_id": 0, "sample_idx": 2, "answer": "12", "response": "Answer: 12"},
    {"example_id": 1, "sample_idx": 0, "answer": "\\frac{1}{2}", "response": "one half, I think"},
    {"example_id": 1, "sample_idx": 1, "answer": "\\frac{1}{2}", "response": "\\boxed{0.6}"},
    {"example_id": 2, "sample_idx": 0, "answer": "2\\sqrt{2}", "response": "\\boxed{\\sqrt{8}}"},
    {"example_id": 2, "sample_idx": 1, "answer": "2\\sqrt{2}", "response": "\\boxed{\\sqrt{8}}"},
]


def test_grade_files_on_a_hand_written_file(tmp_path, capsys):
    f = tmp_path / "math__mymodel__n2.jsonl"
    _write(f, HAND, raw_tail='{"example_id": 9, "resp')  # a run still writing: last line ignored
    res = grade.grade_files([f], workers=1, progress=False)[str(f)]
    assert res["benchmark"] == "math" and res["model"] == "mymodel"
    assert res["mean_score"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert res["best_score"] == pytest.approx(2 / 3)
    assert res["maj_score"] == pytest.approx(2 / 3)
    assert (res["solve_none"], res["solve_all"], res["format_error_rollouts"]) == (1, 1, 1)
    assert res["avg_output_length"] is None  # no response_tokens, no tokenizer
    assert res["truncated_rollouts"] is None  # no finish_reason recorded
    assert "truncated last line" in capsys.readouterr().err


def test_details_files_list_every_verdict_and_are_not_graded_again(tmp_path):
    f = tmp_path / "math__m__s.jsonl"
    _write(f, HAND)
    assert grade.main([str(tmp_path), "--details", "--workers", "1", "--no-progress"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "math__m__s.graded.jsonl").read_text().splitlines()]
    assert [(r["example_id"], r["sample_idx"]) for r in rows] == [(r["example_id"], r["sample_idx"]) for r in HAND]
    assert [r["score"] for r in rows] == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert [r["method"] for r in rows][:4] == ["string", "numeric", "string", "no_answer"]
    assert rows[5]["extracted"] == "\\sqrt{8}" and rows[5]["method"] == "symbolic"
    assert grade.collect_files([str(tmp_path)]) == [f]


def test_grade_errors_name_file_and_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"example_id": 0, "answer": "1"}\n')
    with pytest.raises(DataError, match=r"a.jsonl.*line 1: missing field 'response'"):
        grade.read_outputs(f)
    f.write_text('not json\n{"example_id": 0, "answer": "1", "response": ""}\n')
    with pytest.raises(DataError, match=r"a.jsonl.*line 1: invalid JSON"):
        grade.read_outputs(f)
    with pytest.raises(DataError, match="no such file or folder"):
        grade.collect_files([str(tmp_path / "missing")])


class FakeVerifier:
    """Says CORRECT when the response contains the word 'half'; records what it was asked."""

    def __init__(self):
        self.asked = []

    def judge(self, items):
        self.asked.extend(items)
        return ["CORRECT" if "half" in resp else "INCORRECT" for _, _, resp in items]


def test_verifier_sees_only_rule_failures_and_can_only_raise_scores(tmp_path):
    f = tmp_path / "math__m__s.jsonl"
    _write(f, HAND)
    v = FakeVerifier()
    res = grade.grade_files([f], verifier=v, workers=1, progress=False)[str(f)]
    assert sorted(resp for _, _, resp in v.asked) == sorted(["\\boxed{13}", "one half, I think", "\\boxed{0.6}"])
    assert res["verifier"]["checked"] == 3 and res["verifier"]["correct"] == 1 and res["verifier"]["incorrect"] == 2
    assert res["mean_score"] == pytest.approx((2 / 3 + 0 + 1) / 3)  # rule metrics unchanged
    assert res["verifier"]["mean_score"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert res["verifier"]["best_score"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "text,verdict",
    [
        ("CORRECT", "CORRECT"),
        ("incorrect.", "INCORRECT"),
        ("The answer is INVALID", "INVALID"),
        ("Verdict: Correct, because", "CORRECT"),
        ("INCORRECTLY", "INVALID"),
        ("", "INVALID"),
        ("Not correct: 5 != 6", "INCORRECT"),
        ("<think>Is it correct? Hmm.</think>\nINCORRECT", "INCORRECT"),
        ("<think>correct so far... (cut off)", "INVALID"),
    ],
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_verifier_prompt_keeps_the_end_of_long_responses():
    p = build_prompt("Q?", "42", "x" * 10_000 + "\\boxed{42}")
    assert "\\boxed{42}" in p and "Q?" in p and len(p) < 6000


def test_format_table_rows_are_benchmarks_and_columns_models():
    def r(b, m, mean, best):
        return {
            "benchmark": b,
            "model": m,
            "settings": {"n": 4},
            "mean_score": mean,
            "best_score": best,
            "samples_per_example": {"min": 4, "max": 4},
        }

    t = grade.format_table(
        {"1": r("aime", "base", 0.1, 0.3), "2": r("aime", "opd", 0.2, 0.5), "3": r("amc", "opd", 0.25, 0.5)}
    )
    lines = t.splitlines()
    assert lines[0].split()[-2:] == ["base", "opd"]
    assert lines[2].startswith("aime") and "10.0 / 30.0" in lines[2] and "20.0 / 50.0" in lines[2]
    assert lines[3].startswith("amc") and " - " in lines[3] and "25.0 / 50.0" in lines[3]


def test_benchmark_names_resolve_only_in_the_data_dir(tmp_path):
    (tmp_path / "AIME24.jsonl").write_text(json.dumps({"Problem": "1+1?", "Answer": 2.0}) + "\n")
    assert resolve_benchmark("aime24", tmp_path) == tmp_path / "AIME24.jsonl"
    b = load_benchmark("aime24", tmp_path, template="none")
    assert b.examples[0].answer == "2" and b.examples[0].messages == [{"role": "user", "content": "1+1?"}]
    with pytest.raises(DataError, match=r"'aime25'.*available: AIME24"):
        resolve_benchmark("aime25", tmp_path)
    with pytest.raises(DataError, match="never downloaded"):
        resolve_benchmark("aime25")


def test_benchmark_bad_rows_are_named(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text(
        json.dumps({"problem": "p", "answer": "1"}) + "\n" + json.dumps({"problem": "q", "answer": " "}) + "\n"
    )
    with pytest.raises(DataError, match=r"b.jsonl', row 1, column 'answer'"):
        load_benchmark(str(f))
    f.write_text(json.dumps({"text": "p"}) + "\n")
    with pytest.raises(DataError, match="neither the RL schema"):
        load_benchmark(str(f))


def test_model_verifier_end_to_end(tmp_path, yes_verifier_dir):
    """A real (toy) verifier model that always answers CORRECT turns every rule failure into a success."""
    f = tmp_path / "math__m__s.jsonl"
    recs = [dict(r, question="What is 1 + 1?") for r in HAND]
    _write(f, recs)
    out = tmp_path / "res.json"
    assert (
        grade.main(
            [str(f), "--model-verifier", str(yes_verifier_dir), "--output", str(out), "--no-progress", "--workers", "1"]
        )
        == 0
    )
    res = json.loads(out.read_text())[str(f)]
    assert res["mean_score"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert res["verifier"]["checked"] == 3 and res["verifier"]["correct"] == 3
    assert res["verifier"]["mean_score"] == pytest.approx(1.0)
