"""The lab world's solutions verify step by step, grade correct, and really are ambiguous; wrong ones are caught."""

import math
import random

import pytest

from opd.grading import score_response
from opd.toy.lab_world import (
    PATTERNS,
    TEMPLATES,
    LabProblem,
    corpus,
    ideal_entropy,
    sample_problems,
    solution,
    variants,
    verify,
)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_sampled_solution_verifies_in_its_own_pattern_and_grades_correct(pattern):
    rng = random.Random(7)
    for p in sample_problems(300, seed=3) + [LabProblem(0, 0), LabProblem(99, 99), LabProblem(50, 50)]:
        text = solution(p, pattern, rng)
        assert verify(text, p) == pattern, text
        assert score_response(text, p.answer) == 1.0, text


def test_patterns_differ_and_wrong_steps_are_caught():
    p = LabProblem(57, 68)
    rng = random.Random(0)
    cols, part = solution(p, "columns", rng), solution(p, "partial", rng)
    assert cols.split("\n")[:-1] != part.split("\n")[:-1]
    assert verify(cols.replace("\\boxed{125}", "\\boxed{126}"), p) is None  # wrong answer
    broken = cols.split("\n")
    broken[0] = broken[0].replace("15", "16")  # a wrong step with the right box
    assert verify("\n".join(broken), p) is None
    assert verify("125", p) is None


def test_ambiguity_is_real_and_every_variant_is_reachable():
    p = LabProblem(57, 68)
    for pattern in PATTERNS:
        texts = [solution(p, pattern, random.Random(s)) for s in range(6000)]
        assert all(verify(t, p) == pattern for t in texts)
        per_line = [set(lines) for lines in zip(*(t.split("\n") for t in texts))]
        assert math.prod(len(s) for s in per_line) == variants(p, pattern) > 1000  # lines are drawn independently
    # columns: 2 lines of 3 distinct terms: 6 orders x 3 x 3 plus-synonyms x 3 equals-synonyms each
    assert variants(p, "columns") == (6 * 9 * 3) ** 2


def test_templates_ask_the_same_problem_differently():
    qs = {LabProblem(5, 68, t).question for t in TEMPLATES}
    assert len(qs) == 2 and all("05" in q and "68" in q for q in qs)
    with pytest.raises(ValueError, match="template"):
        LabProblem(1, 2, "other")
    with pytest.raises(ValueError, match="operands"):
        LabProblem(100, 2)


def test_lab_tokenizer_round_trips_the_lab_text():
    from opd.toy import build_toy_tokenizer

    texts = corpus(n=200)
    tok = build_toy_tokenizer(vocab_size=320, texts=texts)
    for text in texts[:50]:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert len(tok.encode(" plus ")) <= 2
    # a teacher matching the data would carry this much entropy per token (the lab's top-k must mean something)
    assert ideal_entropy("columns", tok) > 0.3
    assert ideal_entropy("partial", tok) > 0.2
