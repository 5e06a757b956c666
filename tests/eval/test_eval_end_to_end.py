"""`opd eval gen` + `opd eval grade` on a toy model: numbers re-derived by hand from the generated file; resume,
skip, replace and determinism of generation."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from opd.eval import gen, grade
from opd.toy.task import Problem, rl_rows, write_parquet

GTS = ["1234", "1234", "99", "7"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    rows = rl_rows([Problem(100 + i, 234 - i) for i in range(len(GTS))], "test")
    for r, gt in zip(rows, GTS):
        r["reward_model"]["ground_truth"] = gt
    write_parquet(rows, d / "toyrl.parquet")
    with open(d / "plain.jsonl", "w") as f:
        for i, a in enumerate([1234, 5]):
            f.write(json.dumps({"Problem": f"What is {i} + {a - i}?", "Answer": a}) + "\n")
    return d


def _gen(model_dir, bench_dir, out, *extra):
    return gen.main(
        [
            "--model",
            str(model_dir),
            "--benchmark",
            "toyrl",
            "plain",
            "--data-dir",
            str(bench_dir),
            "--out",
            str(out),
            "--n",
            "4",
            "--max-tokens",
            "24",
            "--seed",
            "3",
            "--batch-size",
            "5",
            "--no-progress",
            *extra,
        ]
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _hand_metrics(recs: list[dict]) -> dict:
    """Independent re-computation: last \\boxed{digits} == ground truth string."""
    by_ex = defaultdict(list)
    gt = {}
    for r in sorted(recs, key=lambda r: (r["example_id"], r["sample_idx"])):
        gt[id(by_ex[r["example_id"]])] = r["answer"]
        boxes = re.findall(r"\\boxed\{([^{}]*)\}", r["response"])
        ans = boxes[-1].strip() if boxes else None
        by_ex[r["example_id"]].append((ans, float(ans == r["answer"]), r["response"], r["response_tokens"]))
    mean = sum(sum(s for _, s, _, _ in v) / len(v) for v in by_ex.values()) / len(by_ex)
    best = sum(max(s for _, s, _, _ in v) for v in by_ex.values()) / len(by_ex)
    maj = []
    for v in by_ex.values():
        answers = [a for a, _, _, _ in v if a is not None]
        if not answers:
            maj.append(0.0)
            continue
        top = max(Counter(answers).values())
        winner = next(a for a in answers if answers.count(a) == top)
        maj.append(float(winner == gt[id(v)]))
    ratios = []
    for v in by_ex.values():
        grams = [tuple(w[i : i + 4]) for _, _, resp, _ in v for w in [resp.split()] for i in range(len(w) - 3)]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return {
        "mean_score": mean,
        "best_score": best,
        "maj_score": sum(maj) / len(maj),
        "solve_none": sum(max(s for _, s, _, _ in v) == 0 for v in by_ex.values()),
        "solve_all": sum(min(s for _, s, _, _ in v) == 1 for v in by_ex.values()),
        "format_error_rollouts": sum(a is None for v in by_ex.values() for a, _, _, _ in v),
        "avg_output_length": sum(t for v in by_ex.values() for _, _, _, t in v) / len(recs),
        "distinct_4gram": sum(ratios) / len(ratios) if ratios else None,
        "n_examples": len(by_ex),
        "n_rollouts": len(recs),
    }


def test_gen_then_grade_matches_hand_computation(parrot_model_dir, bench_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _gen(parrot_model_dir, bench_dir, out) == 0
    files = sorted(out.glob("*.jsonl"))
    assert [f.name.split("__")[0] for f in files] == ["plain", "toyrl"]
    for f in files:
        recs = _lines(f)
        assert len(recs) == 4 * (2 if f.name.startswith("plain") else 4)
        keys = {(r["example_id"], r["sample_idx"]) for r in recs}
        assert keys == {(e, j) for e in range(len(recs) // 4) for j in range(4)}
        assert all(isinstance(r["seed"], int) and r["prompt"].startswith("<|user|>") for r in recs)
        meta = json.loads(f.with_name(f.name.replace(".jsonl", ".meta.json")).read_text())
        assert meta["complete"] and meta["settings_n"] == 4 and meta["settings_temperature"] == 0.7
    plain = _lines(files[0])
    assert "Please reason step by step" in plain[0]["question"] and plain[0]["answer"] == "1234"

    assert grade.main([str(out), "--no-progress", "--workers", "1"]) == 0
    table = capsys.readouterr().out
    results = json.loads((out / "grading_results.json").read_text())
    assert set(results) == {str(f) for f in files}
    mixed = 0
    for f in files:
        got, want = results[str(f)], _hand_metrics(_lines(f))
        for key, value in want.items():
            assert got[key] == pytest.approx(value), (f.name, key)
        assert got["settings"]["n"] == 4 and got["benchmark"] == f.name.split("__")[0]
        assert got["truncated_rollouts"] == sum(
            r["response_tokens"] == 24 and r["finish_reason"] == "length" for r in _lines(f)
        )
        mixed += 0 < got["mean_score"] < 1
        assert f"{100 * got['mean_score']:.1f} / {100 * got['best_score']:.1f}" in table
    assert mixed >= 1, "the parrot model should give a mix of right and wrong answers"
    assert "toyrl" in table and "plain" in table and parrot_model_dir.name in table


def test_grade_tokenizer_flag_counts_tokens(parrot_model_dir, bench_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    _gen(parrot_model_dir, bench_dir, out, "--limit", "1")
    assert (
        grade.main(
            [str(out), "--tokenizer", str(parrot_model_dir), "--no-progress", "--output", str(tmp_path / "r.json")]
        )
        == 0
    )
    tok = AutoTokenizer.from_pretrained(parrot_model_dir)
    results = json.loads((tmp_path / "r.json").read_text())
    for path, res in results.items():
        recs = _lines(Path(path))
        want = sum(len(tok(r["response"], add_special_tokens=False)["input_ids"]) for r in recs) / len(recs)
        assert res["avg_output_length"] == pytest.approx(want)


def test_generation_is_deterministic_and_resumes(parrot_model_dir, bench_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _gen(parrot_model_dir, bench_dir, a)
    _gen(parrot_model_dir, bench_dir, b)
    fa = sorted(a.glob("*.jsonl"))
    assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in sorted(b.glob("*.jsonl"))]

    # interrupt: keep 6 whole lines and half of the 7th, mark unfinished
    f = [x for x in fa if x.name.startswith("toyrl")][0]
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:6]) + lines[6][: len(lines[6]) // 2])
    meta = f.with_name(f.name.replace(".jsonl", ".meta.json"))
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "complete": False}))
    _gen(parrot_model_dir, bench_dir, a)
    resumed = f.read_text().splitlines(keepends=True)
    assert resumed[:6] == lines[:6]
    keys = [(r["example_id"], r["sample_idx"]) for r in map(json.loads, resumed)]
    assert len(keys) == len(set(keys)) == 16
    assert json.loads(meta.read_text())["complete"] is True

    # finished outputs are skipped (a marker survives), --replace regenerates
    marked = f.read_text().replace('"response": "', '"response": "MARK ', 1)
    f.write_text(marked)
    capsys.readouterr()
    _gen(parrot_model_dir, bench_dir, a)
    assert "skip (complete)" in capsys.readouterr().out
    assert f.read_text() == marked
    _gen(parrot_model_dir, bench_dir, a, "--replace")
    assert "MARK" not in f.read_text() and len(f.read_text().splitlines()) == 16


def test_read_done_cuts_a_corrupt_tail(tmp_path):
    p = tmp_path / "x.jsonl"
    good = json.dumps({"example_id": 0, "sample_idx": 0, "response": "a"}) + "\n"
    p.write_text(good + '{"example_id": 0, "sam\n' + good)
    assert gen.read_done(p) == {(0, 0)}
    assert p.read_text() == good


def _gen_other(other, bench_dir, out, *extra):
    return gen.main(
        [
            "--model",
            str(other),
            "--benchmark",
            "toyrl",
            "--data-dir",
            str(bench_dir),
            "--out",
            str(out),
            "--n",
            "4",
            "--max-tokens",
            "24",
            "--seed",
            "3",
            "--batch-size",
            "5",
            "--limit",
            "1",
            "--no-progress",
            *extra,
        ]
    )


@pytest.mark.parametrize("first_run", ["interrupted", "complete"])
def test_another_model_with_the_same_tag_is_refused(parrot_model_dir, bench_dir, tmp_path, capsys, first_run):
    import shutil

    out = tmp_path / "out"
    _gen(parrot_model_dir, bench_dir, out, "--limit", "1")
    other = tmp_path / "elsewhere" / parrot_model_dir.name
    shutil.copytree(parrot_model_dir, other)
    if first_run == "interrupted":
        for meta in out.glob("*.meta.json"):
            meta.write_text(json.dumps({**json.loads(meta.read_text()), "complete": False}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    # neither skipped as "complete" (that would report the first model's samples as the second's) nor resumed
    assert _gen_other(other, bench_dir, out) == 2
    assert "same model tag" in capsys.readouterr().err
    # --replace must not delete the first model's samples either
    assert _gen_other(other, bench_dir, out, "--replace") == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_model_tag_keeps_runs_apart(tmp_path, capsys):
    assert gen.model_tag("/models/Qwen3-1.7B/") == "Qwen3-1.7B"
    assert gen.model_tag("runs/a/checkpoints/step_000200") == "a-step_000200"
    assert gen.model_tag("runs/b/checkpoints/step_000200") == "b-step_000200"
    assert gen.model_tag("saves/cold_start/checkpoint-500") == "cold_start-checkpoint-500"
    assert gen.model_tag("ckpts/exp1/global_step_40/actor/huggingface") == "exp1-global_step_40-huggingface"
    assert gen.model_tag("ckpt/global_step_40/actor/huggingface") == "global_step_40-huggingface"
    # two models that would still share a name in one call: refused before anything is generated
    assert gen.main(["--model", "x/final", "y/x/final", "--benchmark", "b", "--out", str(tmp_path / "o")]) == 2
    assert "share the output name" in capsys.readouterr().err


def test_gen_rejects_bad_settings(capsys):
    assert gen.main(["--model", "m", "--benchmark", "b", "--out", "o", "--top-p", "0"]) == 2
    assert "invalid --top-p 0" in capsys.readouterr().err


def test_thinking_switch_reaches_the_chat_template():
    from opd.generation import render_prompt_ids
    from opd.toy import build_toy_tokenizer

    tok = build_toy_tokenizer()
    tok.chat_template = (
        "{% if enable_thinking is defined %}{{ 'T' if enable_thinking else 'F' }}{% else %}D{% endif %}"
        "{{ messages[0]['content'] }}"
    )
    msgs = [{"role": "user", "content": "1+1"}]
    rendered = {}
    for thinking in ("on", "off", None):
        s = gen.GenSettings(n=1, thinking=thinking)
        rendered[thinking] = tok.decode(render_prompt_ids(tok, msgs, **s.template_kwargs()))
        assert f"think-{thinking or 'default'}" in s.tag()
    assert rendered == {"on": "T1+1", "off": "F1+1", None: "D1+1"}


def test_backend_choice(monkeypatch):
    import argparse

    made = []
    monkeypatch.setattr(gen, "VLLMSampler", lambda path, **kw: made.append(("vllm", path)) or "V")
    monkeypatch.setattr(gen.TransformersSampler, "load", lambda path, **kw: made.append(("hf", path)) or "T")
    args = argparse.Namespace(dtype="auto", tensor_parallel_size=1, max_model_len=None, device="cpu")
    monkeypatch.setattr(gen, "_vllm_usable", lambda: True)
    assert gen.make_backend("auto", "m", args) == "V" and gen.make_backend("transformers", "m", args) == "T"
    monkeypatch.setattr(gen, "_vllm_usable", lambda: False)
    assert gen.make_backend("auto", "m", args) == "T"
    with pytest.raises(ValueError, match="--backend vllm needs the vllm package"):
        gen.make_backend("vllm", "m", args)
    assert made == [("vllm", "m"), ("hf", "m"), ("hf", "m")]
