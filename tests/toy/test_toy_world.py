"""The toy world: task generator, tokenizer round trip and chat template, tiny model configs (all offline)."""

from __future__ import annotations

import random
import re

import pandas as pd
import pytest
import torch

from opd.toy.models import SIZES, build_tiny_model, dims, load_model, n_params, save_model
from opd.toy.task import N_DIGITS, Problem, gold_solution, make_splits, sample_problems, write_datasets
from opd.toy.tokenizer import ASSISTANT, EOS, build_toy_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return build_toy_tokenizer(tok_dir)


def _replay(solution: str) -> tuple[str, str]:
    """Independently re-add the columns written in a solution; returns (digits implied by lines, boxed answer)."""
    lines = solution.split("\n")
    digits, carry = [], 0
    for line in lines[:-1]:
        x, y, c, s = map(int, re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d+)", line).groups())
        assert c == carry and s == x + y + c
        digits.append(s % 10)
        carry = s // 10
    boxed = re.fullmatch(r"\\boxed\{(\d+)\}", lines[-1]).group(1)
    implied = str(int(("1" if carry else "") + "".join(map(str, reversed(digits)))))
    return implied, boxed


def test_gold_solution_is_correct_by_construction():
    rng = random.Random(7)
    cases = [(0, 0), (999, 999), (1, 999), (500, 500), (57, 768)]
    cases += [(rng.randrange(10**N_DIGITS), rng.randrange(10**N_DIGITS)) for _ in range(300)]
    for a, b in cases:
        sol = gold_solution(a, b)
        assert len(sol.split("\n")) == N_DIGITS + 1
        implied, boxed = _replay(sol)
        assert implied == boxed == str(a + b)


def test_gold_solution_example_and_bad_input():
    assert gold_solution(57, 768) == "7+8+0=15\n5+6+1=12\n0+7+1=8\n\\boxed{825}"
    assert gold_solution(457, 768).endswith("4+7+1=12\n\\boxed{1225}")  # the last carry lands in the box
    with pytest.raises(ValueError, match="operands"):
        gold_solution(10**N_DIGITS, 1)
    with pytest.raises(ValueError, match=rf"operands must be in \[0, {10**N_DIGITS}\) \({N_DIGITS} digits\); got a=-1"):
        Problem(-1, 5)


def test_gold_answers_pass_the_rule_grader():
    grading = pytest.importorskip("opd.grading")
    if not hasattr(grading, "score_response"):
        pytest.skip("opd.grading.score_response not available yet")
    probs = sample_problems(40, seed=3)
    assert all(grading.score_response(p.solution, p.answer) == 1.0 for p in probs)
    # and a wrong sum is rejected (the grader really reads the box)
    assert all(
        grading.score_response(gold_solution(p.a, p.b).replace(p.answer, str(int(p.answer) + 1)), p.answer) == 0.0
        for p in probs[:10]
    )


def test_splits_deterministic_disjoint_and_fixed_length():
    s1, s2, s3 = make_splits(0, 300, 50, 100), make_splits(0, 300, 50, 100), make_splits(1, 300, 50, 100)
    assert s1 == s2 and s1 != s3
    keys = {k: {(p.a, p.b) for p in v} for k, v in s1.items()}
    assert len(keys["train"]) == 300 and len(keys["dev"]) == 50 and len(keys["test"]) == 100
    assert not (keys["train"] & keys["dev"]) and not (keys["train"] & keys["test"]) and not (keys["dev"] & keys["test"])
    # test/dev do not move when the train split grows
    assert make_splits(0, 900, 50, 100)["test"] == s1["test"]
    assert len({len(p.question) for v in s1.values() for p in v}) == 1


def test_parquet_schema(tmp_path):
    paths = write_datasets(tmp_path, seed=0, n_train=20, n_dev=5, n_test=6)
    df = pd.read_parquet(paths["test"])
    assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert len(df) == 6 and set(df.data_source) == {"toy_add"} and set(df.ability) == {"math"}
    row = df.iloc[2]
    assert list(row.prompt[0].keys()) == ["role", "content"] and row.prompt[0]["role"] == "user"
    a, b = map(int, re.findall(rf"\d{{{N_DIGITS}}}", row.prompt[0]["content"]))
    assert row.reward_model["ground_truth"] == str(a + b) and row.reward_model["style"] == "rule"
    assert row.extra_info["index"] == 2 and row.extra_info["split"] == "test"
    assert row.extra_info["question"] == row.prompt[0]["content"]
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_tokenizer_round_trip_deterministic_and_digit_level(tok, tok_dir):
    from transformers import AutoTokenizer

    assert 256 < len(tok) < 512
    again = build_toy_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    reloaded = AutoTokenizer.from_pretrained(tok_dir)
    p = Problem(234, 987)
    text = tok.apply_chat_template(p.messages(with_answer=True), tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == text
    for s in ["arbitrary text é ✓ 12+34", p.solution]:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    # digits are never merged with each other
    for i in tok(p.solution, add_special_tokens=False)["input_ids"]:
        assert sum(ch.isdigit() for ch in tok.decode([i])) <= 1
    assert reloaded.eos_token == EOS and reloaded.pad_token_id != reloaded.eos_token_id


def test_chat_template_generation_prompt_and_assistant_mask(tok):
    p = Problem(1, 2)
    prompt = tok.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(p.messages(with_answer=True), tokenize=False)
    assert prompt.endswith(ASSISTANT) and full == prompt + p.solution + EOS
    out = tok.apply_chat_template(
        p.messages(with_answer=True), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_models_sizes_seed_and_save_reload(tok, tmp_path, arch):
    assert dims(3, 96) == {
        "num_hidden_layers": 3,
        "hidden_size": 96,
        "num_attention_heads": 3,
        "num_key_value_heads": 3,
        "intermediate_size": 256,
    }
    with pytest.raises(ValueError, match="width=48"):
        dims(2, 48)
    t, s = build_tiny_model(tok, "teacher", 0, arch), build_tiny_model(tok, "student", 0, arch)
    assert t.config.num_hidden_layers > s.config.num_hidden_layers and n_params(t) > 1.3 * n_params(s)
    m0, m0b, m1 = (build_tiny_model(tok, "tiny", seed, arch) for seed in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(m0.parameters(), m0b.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(m0.parameters(), m1.parameters()))
    assert m0.config.vocab_size == len(tok) and m0.config.eos_token_id == tok.eos_token_id
    save_model(m0, tok, tmp_path / "m")
    m2, tok2 = load_model(tmp_path / "m")
    x = torch.randint(0, len(tok), (2, 9))
    torch.testing.assert_close(m0(x).logits, m2(x).logits)
    # a Qwen2 folder reloads as Qwen2Tokenizer: it must still give the same ids and size
    assert tok2.get_vocab() == tok.get_vocab() and len(tok2) == len(tok) == m2.config.vocab_size
    text = tok.apply_chat_template(Problem(203, 45).messages(with_answer=True), tokenize=False)
    assert tok2(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert tok2.eos_token_id == tok.eos_token_id and tok2.pad_token_id == tok.pad_token_id
    with pytest.raises(ValueError, match="size='huge'"):
        build_tiny_model(tok, "huge")
    assert set(SIZES) == {"teacher", "student", "tiny"}
