"""Prompt loading for the local engine: RL parquet and problem/answer files, chat-template kwargs, length filter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from opd.data.schema import DataError
from opd.engines.local import trainer
from opd.engines.local.data import load_prompt_set

TEMPLATE = "{% if enable_thinking %}<think>{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture
def tok(toy_world):
    return toy_world["tokenizer"]


def test_rl_parquet_rows_are_rendered_once_with_the_chat_template(toy_world, tok):
    prompt_set = load_prompt_set(toy_world["train"], tok, max_prompt_length=1024, template_kwargs={})
    first = prompt_set.problems[0]
    rows = pd.read_parquet(toy_world["train"])
    assert len(prompt_set.problems) == len(rows) and prompt_set.dropped_too_long == 0
    expected = tok.apply_chat_template(list(rows.iloc[0]["prompt"]), add_generation_prompt=True, tokenize=False)
    assert tok.decode(first.prompt_ids) == expected
    assert first.ground_truth == rows.iloc[0]["reward_model"]["ground_truth"] and first.data_source == "toy_add"


def test_overlong_prompts_are_dropped_and_counted(tmp_path, tok):
    from opd.data.schema import make_rl_row, write_rl_parquet

    texts = ["1+1", "12+12+12+12", "123+123+123+123+123+123+123+123"]
    rows = [
        make_rl_row(data_source="s", prompt_text=t, ground_truth="0", index=i, split="train", question=t)
        for i, t in enumerate(texts)
    ]
    path = tmp_path / "lengths.parquet"
    write_rl_parquet(rows, path)
    full = load_prompt_set(str(path), tok, max_prompt_length=1024, template_kwargs={})
    lengths = [len(p.prompt_ids) for p in full.problems]
    assert lengths == sorted(lengths) and len(set(lengths)) == 3
    cut = load_prompt_set(str(path), tok, max_prompt_length=lengths[1], template_kwargs={})
    assert cut.dropped_too_long == 1 and [p.index for p in cut.problems] == [0, 1]
    with pytest.raises(ValueError, match="no usable prompt"):
        load_prompt_set(str(path), tok, max_prompt_length=lengths[0] - 1, template_kwargs={})


def test_problem_answer_files_and_bad_files(tmp_path, tok):
    good = tmp_path / "aime.parquet"
    pd.DataFrame({"problem": ["1+1?", "2+2?"], "answer": ["2", "4"]}).to_parquet(good)
    prompt_set = load_prompt_set(str(good), tok, max_prompt_length=1024, template_kwargs={})
    assert [p.ground_truth for p in prompt_set.problems] == ["2", "4"]
    assert prompt_set.problems[0].data_source == "aime"  # the file stem when there is no data_source column
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"question_text": ["x"], "solution": ["y"]}).to_parquet(bad)
    with pytest.raises(DataError, match=r"bad\.parquet.*expected the RL schema"):
        load_prompt_set(str(bad), tok, max_prompt_length=1024, template_kwargs={})
    empty = tmp_path / "empty_answer.parquet"
    pd.DataFrame({"problem": ["x"], "answer": [" "]}).to_parquet(empty)
    with pytest.raises(DataError, match="row 0, column 'answer'"):
        load_prompt_set(str(empty), tok, max_prompt_length=1024, template_kwargs={})
    with pytest.raises(FileNotFoundError, match="opd data prepare"):
        load_prompt_set(str(tmp_path / "missing.parquet"), tok, max_prompt_length=1024, template_kwargs={})


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_an_aime_file_opd_eval_gen_reads_is_a_test_file(tiny_cfg, tok, tmp_path, suffix):
    """Problem/Answer columns (an AIME upload; pandas stores the integer answers of a parquet as floats)."""
    from opd.eval.benchmarks import load_benchmark

    fixture = Path(__file__).parents[1] / "fixtures" / "data" / "aime_mini.json"
    aime = tmp_path / f"aime24{suffix}"
    if suffix == ".parquet":
        frame = pd.DataFrame(json.loads(fixture.read_text()))
        frame["Answer"] = frame["Answer"].astype(float)
        frame.to_parquet(aime)
    else:
        shutil.copy(fixture, aime)
    bench = load_benchmark(str(aime), template="none")
    s = trainer.setup(tiny_cfg(test_files=[str(aime)]))
    problems = s.val_sets[0].problems
    assert [p.ground_truth for p in problems] == [e.answer for e in bench.examples] == ["9", "24"]
    assert [tok.decode(p.prompt_ids) for p in problems] == [
        tok.apply_chat_template(e.messages, add_generation_prompt=True, tokenize=False) for e in bench.examples
    ]
    assert {p.data_source for p in problems} == {"aime24"}
    assert set(trainer.run_validation(s, 0)) >= {"val/aime24/mean@2", "val/aime24/maj@2"}


def test_problem_answer_errors_name_the_file_and_the_columns(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"Problem": "1+1?", "Solution": "2"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl.*problem/question \+ answer/final_answer/.*any case.*Solution"):
        load_prompt_set(str(bad), tok, max_prompt_length=1024, template_kwargs={})
    bad.write_text(json.dumps({"Problem": "1+1?", "Answer": [2]}) + "\n")
    with pytest.raises(DataError, match=r"row 0, column 'Answer': expected a string, got list"):
        load_prompt_set(str(bad), tok, max_prompt_length=1024, template_kwargs={})


@pytest.mark.parametrize("enable_thinking, starts_with_think", [(True, True), (False, False), (None, False)])
def test_enable_thinking_reaches_the_chat_template(toy_world, tiny_cfg, tmp_path, enable_thinking, starts_with_think):
    from opd.toy import build_tiny_model, save_model

    tok = toy_world["tokenizer"]
    original = tok.chat_template
    tok.chat_template = TEMPLATE
    try:
        folder = save_model(build_tiny_model(tok, size="tiny", seed=1), tok, tmp_path / "thinking_student")
    finally:
        tok.chat_template = original
    s = trainer.setup(tiny_cfg(actor_model_path=folder, reward_model_path=folder, enable_thinking=enable_thinking))
    text = s.tokenizer.decode(s.train_set.problems[0].prompt_ids)
    assert text.startswith("<think>") == starts_with_think
