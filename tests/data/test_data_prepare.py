"""`opd data prepare` on our fixtures (one per published layout): valid schema rows, the chosen template applied
around the raw question, drops counted by reason, parquet == JSONL input, and malformed input rejected with an
error naming the file, row and column. Also the schema validator and template round trips."""

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd.data import prepare as pr
from opd.data.schema import DataError, make_rl_row, read_rl_parquet, validate_rl_rows, write_rl_parquet
from opd.data.templates import BOXED, DAPO, TEMPLATES, apply_template, load_template, strip_template

FIX = Path(__file__).parents[1] / "fixtures" / "data"

# fixture -> (layout, kept, dropped, first question, first answer, data_source)
EXPECTED = {
    "dapo_mini.jsonl": (
        "dapo",
        4,
        {"repeated question": 1},
        "What is the sum of the first 10 positive odd integers?",
        "100",
        "DAPO-Math-17k",
    ),
    "deepmath_mini.jsonl": (
        "deepmath",
        3,
        {"empty answer": 1},
        "Evaluate the limit $\\lim_{x\\to 0} \\frac{\\sin 3x}{x}$.",
        "3",
        "DeepMath-103K",
    ),
    "openthoughts_mini.jsonl": (
        "openthoughts",
        2,
        {"domain is not math": 1, "no \\boxed answer in the assistant turn": 1},
        "Find the remainder when $7^{100}$ is divided by $5$.",
        "1",
        "OpenThoughts3-math",
    ),
    "math500_mini.jsonl": (
        "benchmark",
        2,
        {},
        "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "math500_mini",
    ),
    "aime_mini.json": (
        "benchmark",
        2,
        {},
        "Find the number of ordered pairs $(a,b)$ of positive integers with $a+b=10$.",
        "9",
        "aime_mini",
    ),
    "amc_mini.jsonl": ("benchmark", 2, {}, None, "8", "amc_mini"),
}


def convert(paths, **kw):
    kw.setdefault("template", BOXED)
    return pr.convert_files([Path(p) for p in paths], progress=False, **kw)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_converts_to_valid_rows(name, tmp_path):
    layout, kept, dropped, question, answer, source = EXPECTED[name]
    res = convert([FIX / name])
    assert res.formats == {str(FIX / name): layout}
    assert len(res.rows) == kept and res.dropped == dropped and res.read == kept + sum(dropped.values())
    validate_rl_rows(res.rows)
    for i, row in enumerate(res.rows):
        info = row["extra_info"]
        assert info["index"] == i and info["split"] == "train"
        assert row["prompt"] == [{"role": "user", "content": apply_template(BOXED, info["question"])}]
        assert row["data_source"] == source and row["reward_model"]["style"] == "rule"
    first = res.rows[0]
    if question is not None:
        assert first["extra_info"]["question"] == question
    assert first["reward_model"]["ground_truth"] == answer
    write_rl_parquet(res.rows, tmp_path / "out.parquet")
    assert read_rl_parquet(tmp_path / "out.parquet") == res.rows  # survives the parquet round trip


def test_layout_specific_fields():
    ot = convert([FIX / "openthoughts_mini.jsonl"]).rows
    assert ot[1]["reward_model"]["ground_truth"] == "\\frac{3}{4}"  # last box, nested braces intact
    assert ot[0]["extra_info"]["source"] == "ai2-adapt-dev/openmath-2-math"
    m5 = convert([FIX / "math500_mini.jsonl"]).rows[0]["extra_info"]
    assert (m5["subject"], m5["level"], m5["source_id"]) == ("Precalculus", 2, "test/precalculus/807.json")
    amc = convert([FIX / "amc_mini.jsonl"]).rows
    assert [r["reward_model"]["ground_truth"] for r in amc] == ["8", "0.25"]  # 8.0 -> "8"
    dm = convert([FIX / "deepmath_mini.jsonl"]).rows[0]["extra_info"]
    assert dm["difficulty"] == 4.0 and dm["topic"].startswith("Mathematics")
    assert "r1_solution_1" not in dm
    dapo = convert([FIX / "dapo_mini.jsonl"]).rows
    assert dapo[1]["extra_info"]["source_id"] == "a1b2c3-1"


def _to_parquet(src: Path, dst: Path) -> Path:
    lines = src.read_text().splitlines()
    recs = json.loads(src.read_text()) if src.suffix == ".json" else [json.loads(x) for x in lines]
    pq.write_table(pa.Table.from_pylist(recs), dst)
    return dst


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parquet_input_equals_json_input(name, tmp_path):
    pq_path = _to_parquet(FIX / name, tmp_path / (Path(name).stem + ".parquet"))
    a, b = convert([FIX / name]), convert([pq_path])
    assert a.rows == b.rows and a.dropped == b.dropped


def test_dapo_template_is_stripped_exactly(tmp_path):
    q = "Let $a_1 = 1$ and\n$a_{n+1} = 2a_n$.\n\nFind $a_5$."
    rec = {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": apply_template(DAPO, q)}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "16", "style": "rule"},
        "extra_info": {"index": "u-1"},
    }
    pq.write_table(pa.Table.from_pylist([rec]), tmp_path / "dapo.parquet")
    for name, template in TEMPLATES.items():
        row = convert([tmp_path / "dapo.parquet"], template=template).rows[0]
        assert row["extra_info"]["question"] == q  # line breaks kept
        assert row["prompt"][0]["content"] == template.replace("{problem}", q), name
    assert convert([tmp_path / "dapo.parquet"]).notes == {}
    rec["prompt"][0]["content"] = "Unknown wrapper: " + q
    pq.write_table(pa.Table.from_pylist([rec]), tmp_path / "other.parquet")
    res = convert([tmp_path / "other.parquet"])
    assert res.rows[0]["extra_info"]["question"] == "Unknown wrapper: " + q
    assert list(res.notes.values()) == [1] and "no known template" in next(iter(res.notes))


def test_several_inputs_limit_and_split():
    res = convert([FIX / "aime_mini.json", FIX / "amc_mini.jsonl"], split="test", template=load_template("dapo"))
    assert [r["extra_info"]["index"] for r in res.rows] == [0, 1, 2, 3]
    assert [r["data_source"] for r in res.rows] == ["aime_mini"] * 2 + ["amc_mini"] * 2
    assert all(r["extra_info"]["split"] == "test" for r in res.rows)
    assert res.rows[0]["prompt"][0]["content"].startswith("Solve the following math problem step by step.")
    assert len(convert([FIX / "aime_mini.json", FIX / "amc_mini.jsonl"], limit=3).rows) == 3


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize(
    "fmt,recs,row,column",
    [
        (
            "deepmath",
            [{"question": "q", "final_answer": "1"}, {"question": ["not", "text"], "final_answer": "2"}],
            1,
            "question",
        ),
        ("deepmath", [{"question": "q", "final_answer": "1"}, {"question": "q2"}], 1, "final_answer"),
        ("benchmark", [{"problem": "p", "answer": {"value": 3}}], 0, "answer"),
        ("openthoughts", [{"domain": "math", "conversations": "hello"}], 0, "conversations"),
        ("dapo", [{"prompt": [{"role": "user", "content": "q"}], "reward_model": "7"}], 0, "reward_model"),
        ("dapo", [{"prompt": "q", "reward_model": {"ground_truth": "7"}}], 0, "prompt"),
    ],
)
def test_malformed_input_names_file_row_column(tmp_path, fmt, recs, row, column):
    path = _write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError) as e:
        convert([path], fmt=fmt)
    msg = str(e.value)
    assert "bad.jsonl" in msg and f"row {row}" in msg and f"column '{column}'" in msg
    assert (e.value.row, e.value.column) == (row, column)


def test_benchmark_without_answer_column_and_undetectable_layout(tmp_path):
    path = _write_jsonl(tmp_path / "b.jsonl", [{"problem": "p", "solution": "s"}])
    with pytest.raises(DataError, match="cannot tell the layout"):
        convert([path])
    with pytest.raises(DataError, match=r"row 0: no answer column; expected one of \['answer'"):
        convert([path], fmt="benchmark")


def test_one_problem_answer_column_rule_and_cell_reader():
    from opd.data.schema import cell_text, resolve_problem_columns

    assert resolve_problem_columns(["ID", "Problem", "Answer"]) == ("Problem", "Answer")  # AIME uploads
    assert resolve_problem_columns(["question", "final_answer"]) == ("question", "final_answer")
    assert resolve_problem_columns(["Question", "problem", "ground_truth", "answer"]) == ("problem", "answer")
    assert resolve_problem_columns(["Problem", "problem", "Answer"]) == ("problem", "Answer")
    assert resolve_problem_columns(["problem", "solution"]) == ("problem", None)
    values = (33.0, 2.5, 7, " x ", "", None, float("nan"))
    assert [cell_text(v) for v in values] == ["33", "2.5", "7", "x", None, None, None]
    with pytest.raises(TypeError, match="expected a string, got list"):
        cell_text([1])
    # opd data prepare detects the same layout as the trainer and opd eval gen (any case, the same answer names)
    assert pr.detect_format(["Problem", "Answer"], Path("a.jsonl")).name == "benchmark"
    assert pr.detect_format(["problem", "ground_truth"], Path("a.jsonl")).name == "benchmark"


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"problem": "p", "answer": "1"}\n{"problem": "p2", "answer": \n')
    with pytest.raises(DataError, match=r"x.jsonl.*row 1.*line 2"):
        convert([path], fmt="benchmark")


def test_cli_error_leaves_no_output(tmp_path, capsys):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": ["x"], "final_answer": "1"}])
    out = tmp_path / "o.parquet"
    rc = pr.main(["--input", str(bad), "--output", str(out), "--format", "deepmath", "--no-progress"])
    assert rc == 1 and not out.exists()
    assert "row 0" in capsys.readouterr().err
    rc = pr.main(
        ["--input", str(FIX / "deepmath_mini.jsonl"), "--output", str(out), "--template", "dapo", "--no-progress"]
    )
    assert rc == 0 and len(read_rl_parquet(out)) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["kept"] == 3 and report["dropped"] == {"empty answer": 1}
    assert not list(tmp_path.glob(".*.tmp"))


def test_user_template_file(tmp_path):
    t = tmp_path / "t.txt"
    t.write_text("Problem: {problem}\nAnswer in \\boxed{}.\n")
    template = load_template(str(t))
    assert apply_template(template, " 1+1? ") == "Problem: 1+1?\nAnswer in \\boxed{}."
    assert strip_template(apply_template(template, "1+1?"), [template]) == "1+1?"
    t.write_text("{problem} and {problem}")
    with pytest.raises(ValueError, match="exactly one"):
        load_template(str(t))
    with pytest.raises(ValueError, match="unknown template"):
        load_template("no-such-template")


def test_strip_template_round_trip_random():
    rng = random.Random(0)
    words = ["Find", "$x$", "if", "\\frac{1}{2}", "the", "sum", "\\boxed{}", "of", "primes", "?"]
    for _ in range(200):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        q = q.replace(" the ", rng.choice([" the ", "\nthe\n", "  the "]))
        for t in TEMPLATES.values():
            templated = apply_template(t, q)
            assert strip_template(templated, normalize=False) == q.strip()
            assert strip_template(templated) == " ".join(q.split())


def test_schema_validator_names_row_and_column(tmp_path):
    rows = [
        make_rl_row(data_source="s", prompt_text=f"q{i}", ground_truth="1", index=i, split="train", question=f"q{i}")
        for i in range(3)
    ]
    rows[2]["reward_model"] = {"ground_truth": "", "style": "rule"}
    with pytest.raises(DataError, match=r"row 2, column 'reward_model'"):
        write_rl_parquet(rows, tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()
    rows[2]["reward_model"]["ground_truth"] = "1"
    rows[2]["extra_info"]["index"] = 0
    with pytest.raises(DataError, match=r"row 2.*index 0 already used by row 0"):
        validate_rl_rows(rows)
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "y.parquet")
    with pytest.raises(DataError, match=r"y.parquet.*column 'data_source'.*opd data prepare"):
        read_rl_parquet(tmp_path / "y.parquet")


def test_mixed_extra_types_across_inputs_become_text(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"problem": "p1", "answer": "1", "level": 2}])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"problem": "p2", "answer": "2", "level": "Level 3"}])
    res = convert([a, b])
    assert [r["extra_info"]["level"] for r in res.rows] == ["2", "Level 3"]
    write_rl_parquet(res.rows, tmp_path / "o.parquet")
    assert read_rl_parquet(tmp_path / "o.parquet") == res.rows
    bad = [dict(r, extra_info=dict(r["extra_info"])) for r in res.rows]
    bad[0]["extra_info"]["level"] = 2
    with pytest.raises(DataError, match="disagree"):
        write_rl_parquet(bad, tmp_path / "p.parquet")
