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


@pytest.mark.slow
def test_a_briefly_trained_model_learns_the_ambiguity_not_one_fixed_text():
    """After a short SFT on uniformly drawn variants, the operator after the first addend (`+`, ` plus ` or ` and `)
    is spread over the three synonyms: the trained model's top-k carries meaning, unlike the demo world's."""
    import torch

    from opd.generation import render_prompt_ids
    from opd.sft.trainer import SFTConfig, encode_dataset, train_sft
    from opd.toy import build_tiny_model, build_toy_tokenizer
    from opd.toy.lab_world import PLUS

    torch.manual_seed(0)
    tok = build_toy_tokenizer(vocab_size=320, texts=corpus(n=400))
    rng = random.Random(0)
    convs = [p.messages(solution(p, "columns", rng)) for p in sample_problems(2000, seed=1)]
    model = build_tiny_model(tok, "student", seed=1)
    train_sft(
        model,
        encode_dataset(tok, convs, max_length=128),
        SFTConfig(lr=3e-3, steps=250, batch_size=32, seed=0),
        pad_token_id=tok.pad_token_id,
    )
    model.eval()
    on_ops, spread = [], []
    with torch.no_grad():
        for p in sample_problems(40, seed=9):
            first = str(p.a % 10)
            ops = sorted({tok.encode(f"{first}{op}5")[1] for op in PLUS})
            assert len(ops) == 3  # the synonyms start with different tokens
            ids = torch.tensor([render_prompt_ids(tok, p.messages()) + tok.encode(first)])
            probs = model(input_ids=ids).logits[0, -1].float().softmax(-1)[ops]
            on_ops.append(float(probs.sum()))
            q = probs / probs.sum()
            spread.append(float(-(q * q.log()).sum()))
    assert sum(on_ops) / len(on_ops) > 0.9  # it writes an operator ...
    assert sum(spread) / len(spread) > 0.9  # ... and keeps all three open (ln 3 = 1.10 if uniform)
