"""The rule grader agrees with other projects' graders on their own labelled cases (tests/eval/peer_cases.py).

Agreement is asserted on the cases whose label is not a debatable convention (each debatable case says why), and
the false-positive kinds the grader once had (a ground truth cut to its last box, ``12, 345`` read as 12345,
sympy ``Eq(...)`` read as its right-hand side, an answer boxed inside ``<think>``) must never grade correct.
Run with ``-s`` to see the report.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from opd.grading import grade_batch

sys.path.insert(0, str(Path(__file__).parent))
from peer_cases import CASES  # noqa: E402

MIN_AGREEMENT = 0.97


@pytest.fixture(scope="module")
def verdicts() -> list[float]:
    scores: list[float] = [0.0] * len(CASES)
    for flag in (False, True):
        rows = [i for i, c in enumerate(CASES) if c.after_think == flag]
        graded = grade_batch(
            [CASES[i].response for i in rows], [CASES[i].ground_truth for i in rows], workers=2, only_after_think=flag
        )
        for i, g in zip(rows, graded):
            scores[i] = g.score
    return scores


def test_peer_table_is_large_and_sourced():
    assert len(CASES) >= 400
    sources = Counter(c.source.split()[0] for c in CASES)
    assert len(sources) >= 8, sources
    for c in CASES:
        assert c.expected in (0.0, 1.0) and " " in c.source  # "owner/repo path"
        assert not c.debatable or len(c.debatable) >= 30  # a reason, not a tag


def test_agreement_with_peer_graders(verdicts):
    firm = [i for i, c in enumerate(CASES) if not c.debatable]
    agree = [i for i in firm if verdicts[i] == CASES[i].expected]
    every = sum(v == c.expected for v, c in zip(verdicts, CASES))
    by_source: dict[str, list[int]] = {}
    for i in firm:
        by_source.setdefault(CASES[i].source.split()[0], []).append(int(verdicts[i] == CASES[i].expected))
    print(f"\npeer agreement: {len(agree)}/{len(firm)} non-debatable ({len(agree) / len(firm):.1%}), ", end="")
    print(f"{every}/{len(CASES)} all cases ({every / len(CASES):.1%}); {len(CASES) - len(firm)} debatable")
    for src, hits in sorted(by_source.items()):
        print(f"  {src}: {sum(hits)}/{len(hits)}")
    for i in sorted(set(firm) - set(agree)):
        c = CASES[i]
        print(f"  disagree #{i} ({c.source}): expected {c.expected}, got {verdicts[i]}:")
        print(f"    {c.response[-80:]!r} vs {c.ground_truth[:60]!r}")
    assert len(agree) / len(firm) >= MIN_AGREEMENT


def test_no_false_positive_on_the_listed_kinds(verdicts):
    kinds = [i for i, c in enumerate(CASES) if c.kind]
    assert {CASES[i].kind for i in kinds} >= {"gt_boxes", "thousands", "sympy_syntax", "think", "empty"}
    wrong = [(i, CASES[i].kind) for i in kinds if CASES[i].expected == 0.0 and verdicts[i] != 0.0]
    assert not wrong
