"""`opd data dedup` with the offline default embedding model: planted exact (differently templated) and
paraphrased duplicates are removed, distinct questions are kept; FAISS scores match a float64 brute force."""

import json
import os

import numpy as np
import pytest

if os.environ.get("CI"):  # CI installs the dedup extra: a broken install must fail these tests, not skip them
    import faiss  # noqa: F401
    import sentence_transformers  # noqa: F401
else:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("faiss")

from opd.data import dedup as dd  # noqa: E402
from opd.data.schema import make_rl_row, read_rl_parquet, write_rl_parquet  # noqa: E402
from opd.data.templates import BOXED, DAPO, apply_template  # noqa: E402

AGAINST = [
    "What is the sum of the first 10 positive odd integers?",
    "How many positive divisors does $72$ have?",
    "Evaluate the limit $\\lim_{x\\to 0} \\frac{\\sin 3x}{x}$.",
    "A rectangle has perimeter 20 and area 21. Find the length of its longer side.",
]
EXACT = [AGAINST[3], "How many   positive divisors\ndoes $72$ have?"]  # same text, other whitespace/template
PARAPHRASES = [
    "Compute the sum of the first ten odd positive integers.",
    "Find the limit of sin(3x)/x as x approaches 0.",
]
DISTINCT = [
    "How many ways can 5 distinct books be arranged on a shelf?",
    "Find the area of a circle with radius 3.",
    "Solve for $y$: $2y - 7 = 11$.",
]


def rows_without_question(questions, template, source):
    """Rows as a foreign RL file would have them: only the templated prompt, no raw question in extra_info."""
    rows = [
        make_rl_row(
            data_source=source,
            prompt_text=apply_template(template, q),
            ground_truth="1",
            index=i,
            split="train",
            question=q,
        )
        for i, q in enumerate(questions)
    ]
    for r in rows:
        del r["extra_info"]["question"]
    return rows


@pytest.fixture(scope="module")
def embedder():
    return dd.load_embedder(None)


def test_default_model_is_bundled_in_site_packages():
    path = dd.default_model_path()
    assert "site-packages" in path and path.endswith("model")


def test_template_stripping_makes_exact_keys_meet():
    a = rows_without_question(AGAINST, DAPO, "a")
    s = rows_without_question(EXACT, BOXED, "s")
    assert a[3]["prompt"][0]["content"] != s[0]["prompt"][0]["content"]
    assert dd.question_key(a[3]) == dd.question_key(s[0]) == AGAINST[3]
    assert dd.question_key(a[1]) == dd.question_key(s[1])


def test_exact_stage_alone():
    keys = [dd.question_key(r) for r in rows_without_question(EXACT + DISTINCT, BOXED, "s")]
    res = dd.dedup(keys, [dd.question_key(r) for r in rows_without_question(AGAINST, DAPO, "a")], semantic=False)
    assert res.exact == [(0, 3), (1, 1)] and res.semantic == [] and res.kept == [2, 3, 4]


def test_planted_duplicates_removed_distinct_kept(embedder):
    src = EXACT + PARAPHRASES + DISTINCT
    src_keys = [dd.question_key(r) for r in rows_without_question(src, BOXED, "s")]
    against_keys = [dd.question_key(r) for r in rows_without_question(AGAINST, DAPO, "a")]
    res = dd.dedup(src_keys, against_keys, embedder=embedder, progress=False)
    assert sorted(i for i, _ in res.exact) == [0, 1]  # caught by the exact stage, not by embeddings
    assert [(i, j) for i, j, _ in res.semantic] == [(2, 0), (3, 2)]
    assert res.kept == [4, 5, 6]
    assert res.stats["exact_duplicates"] == 2 and res.stats["semantic_duplicates"] == 2

    # FAISS inner-product scores == float64 cosine brute force on the same embeddings
    a = dd.embed(against_keys, embedder, progress=False).astype(np.float64)
    s = dd.embed([src_keys[i] for i in (2, 3, 4, 5, 6)], embedder, progress=False).astype(np.float64)
    cos = (s / np.linalg.norm(s, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T
    for r, (i, j, c) in enumerate(res.semantic):
        assert int(cos[r].argmax()) == j and c == pytest.approx(cos[r].max(), abs=1e-5)
    assert (cos[2:].max(axis=1) < dd.DEFAULT_THRESHOLD).all()  # the kept ones really are below threshold

    strict = dd.dedup(src_keys, against_keys, embedder=embedder, threshold=0.99, progress=False)
    assert strict.semantic == [] and strict.kept == [2, 3, 4, 5, 6]


def test_cli_writes_filtered_parquet_and_report(tmp_path, capsys):
    src_rows = rows_without_question(EXACT + PARAPHRASES + DISTINCT, BOXED, "s")
    write_rl_parquet(src_rows, tmp_path / "s.parquet")
    write_rl_parquet(rows_without_question(AGAINST, DAPO, "a"), tmp_path / "a.parquet")
    out, report = tmp_path / "kept.parquet", tmp_path / "report.json"
    rc = dd.main(
        [
            "--source",
            str(tmp_path / "s.parquet"),
            "--against",
            str(tmp_path / "a.parquet"),
            "--output",
            str(out),
            "--report",
            str(report),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    kept = read_rl_parquet(out)
    assert [r["prompt"] for r in kept] == [r["prompt"] for r in src_rows[4:]]
    rep = json.loads(report.read_text())
    assert rep["kept"] == 3 and len(rep["exact"]) == 2 and len(rep["semantic"]) == 2
    assert "[exact 1.000]" in printed and "[semantic 0." in printed
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_bad_model_path_is_a_clear_error(tmp_path, capsys):
    write_rl_parquet(rows_without_question(AGAINST, DAPO, "a"), tmp_path / "a.parquet")
    rc = dd.main(
        [
            "--source",
            str(tmp_path / "a.parquet"),
            "--against",
            str(tmp_path / "a.parquet"),
            "--output",
            str(tmp_path / "o.parquet"),
            "--model",
            str(tmp_path / "nope"),
        ]
    )
    assert rc == 1 and "nope" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()
