"""`opd rollout` logic with a scripted sampler: rejection/retry/abandon accounting, sorted ShareGPT output,
resume after a crash without duplicates or losses, torn partial lines, settings mismatch; plus one real tiny-model
run through the transformers backend."""

import collections
import json
import re

import pytest

from opd.data.rejection import REASONS
from opd.data.rollout import RolloutSettings, main, parts_dir, rollout, summary_path
from opd.data.schema import make_rl_row, write_rl_parquet

GOOD = "Work.\nThe answer is $\\boxed{{{}}}$."
NO_BOX = "I give up."
LOOP_LINE = "\n".join(["This is a long repeated line of reasoning."] * 6) + "\n\\boxed{1}"


def write_prompts(path, n):
    rows = [
        make_rl_row(
            data_source="t",
            prompt_text=f"Q{i}: what is {i}+{i}?",
            ground_truth=str(2 * i),
            index=i,
            split="train",
            question=f"what is {i}+{i}?",
        )
        for i in range(n)
    ]
    write_rl_parquet(rows, path)
    return rows


class Scripted:
    """Per prompt, the k-th request for it gets script[k] (default: a good answer); fails after `crash_after` calls."""

    def __init__(self, scripts=None, crash_after=None):
        self.scripts = scripts or {}
        self.seen = collections.Counter()
        self.calls = 0
        self.crash_after = crash_after
        self.requests = collections.Counter()

    def __call__(self, prompts):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        out = []
        for msgs in prompts:
            i = int(re.match(r"Q(\d+)", msgs[-1]["content"]).group(1))
            k = self.seen[i]
            self.seen[i] += 1
            self.requests[i] += 1
            script = self.scripts.get(i, [])
            out.append(script[k] if k < len(script) else GOOD.format(f"{i}.{k}"))
        return out


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_rejection_accounting_and_sorted_output(tmp_path):
    rows = write_prompts(tmp_path / "p.parquet", 5)
    gen = Scripted({1: [NO_BOX], 2: [LOOP_LINE] * 99, 3: [NO_BOX, NO_BOX, LOOP_LINE]})
    s = RolloutSettings(model="fake", n=2, rejection_sampling=True, max_attempts=3)
    out = tmp_path / "sft" / "answers.jsonl"
    summary = rollout(tmp_path / "p.parquet", out, s, gen, batch_prompts=2, progress=False)

    lines = read_jsonl(out)
    users = [ln["messages"][0]["content"] for ln in lines]
    assert users == sorted(users, key=lambda u: int(u[1 : u.index(":")]))  # sorted by prompt index
    per_prompt = collections.Counter(int(u[1 : u.index(":")]) for u in users)
    # Q2 loops every time: both slots abandoned after 3 attempts each; Q3 slot 0 gets NO_BOX then LOOP then good
    assert per_prompt == {0: 2, 1: 2, 3: 2, 4: 2}
    for ln in lines:
        assert [m["role"] for m in ln["messages"]] == ["user", "assistant"]
        assert ln["messages"][0] == rows[int(ln["messages"][0]["content"][1])]["prompt"][0]
    assert summary["rejections"] == {"no_boxed": 3, "repeated_line": 7, "repeated_window": 0, "repeated_block": 0}
    assert list(summary["rejections"]) == list(REASONS)
    assert summary["abandoned_slots"] == 2 and summary["accepted"] == 8 and summary["slots"] == 10
    assert summary["completion_rate"] == pytest.approx(0.8)
    assert summary["attempts"] == 10 + 10 - 2  # one per slot, plus a retry per rejection except the 2 abandonments
    assert summary["attempts"] == sum(gen.requests.values())
    assert json.loads(summary_path(out).read_text()) == summary


def test_without_rejection_sampling_everything_is_kept(tmp_path):
    write_prompts(tmp_path / "p.parquet", 3)
    gen = Scripted({0: [NO_BOX], 1: [LOOP_LINE]})
    s = RolloutSettings(model="fake", n=1, rejection_sampling=False)
    summary = rollout(tmp_path / "p.parquet", tmp_path / "o.jsonl", s, gen, progress=False)
    texts = [ln["messages"][1]["content"] for ln in read_jsonl(tmp_path / "o.jsonl")]
    assert texts == [NO_BOX, LOOP_LINE, GOOD.format("2.0")]
    assert summary["rejections"] == dict.fromkeys(REASONS, 0) and summary["completion_rate"] == 1.0


def test_interrupted_rollout_resumes_without_duplicates(tmp_path):
    write_prompts(tmp_path / "p.parquet", 7)
    scripts = {2: [NO_BOX], 5: [LOOP_LINE, LOOP_LINE]}
    s = RolloutSettings(model="fake", n=2, rejection_sampling=True, max_attempts=3)

    reference = tmp_path / "ref.jsonl"
    rollout(tmp_path / "p.parquet", reference, s, Scripted(scripts), batch_prompts=2, progress=False)

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):  # crash in the middle of the third batch (prompts 4, 5)
        rollout(tmp_path / "p.parquet", out, s, Scripted(scripts, crash_after=4), batch_prompts=2, progress=False)
    assert not out.exists()  # no final output from a crashed run
    part = parts_dir(out) / "worker-0.jsonl"
    finished = [json.loads(x)["prompt_index"] for x in part.read_text().splitlines()]
    assert finished == [0, 1, 3, 2, 4]  # written as finished; 4 finished in round 1 of its batch, 5 was retrying

    second = Scripted(scripts)
    summary = rollout(tmp_path / "p.parquet", out, s, second, batch_prompts=2, progress=False)
    assert set(second.requests) == {5, 6}  # finished prompts were not sampled again
    assert out.read_text() == reference.read_text()
    assert summary["accepted"] == 14 and summary["complete"]
    assert summary["rejections"]["repeated_line"] == 2 and summary["rejections"]["no_boxed"] == 1


def test_torn_partial_line_is_redone(tmp_path):
    write_prompts(tmp_path / "p.parquet", 3)
    s = RolloutSettings(model="fake", n=1)
    out = tmp_path / "o.jsonl"
    rollout(tmp_path / "p.parquet", out, s, Scripted(), progress=False, limit=2)
    part = parts_dir(out) / "worker-0.jsonl"
    with open(part, "a") as f:
        f.write('{"prompt_index": 2, "respo')  # crash during a write
    gen = Scripted()
    rollout(tmp_path / "p.parquet", out, s, gen, progress=False)
    assert dict(gen.requests) == {2: 1}
    assert len(read_jsonl(out)) == 3
    assert [json.loads(x)["prompt_index"] for x in part.read_text().splitlines()] == [0, 1, 2]


def test_changed_settings_refuse_to_resume(tmp_path):
    write_prompts(tmp_path / "p.parquet", 2)
    out = tmp_path / "o.jsonl"
    rollout(tmp_path / "p.parquet", out, RolloutSettings(model="fake", n=1), Scripted(), progress=False)
    with pytest.raises(ValueError, match="temperature"):
        rollout(
            tmp_path / "p.parquet", out, RolloutSettings(model="fake", n=1, temperature=0.7), Scripted(), progress=False
        )
    gen = Scripted()
    rollout(
        tmp_path / "p.parquet",
        out,
        RolloutSettings(model="fake", n=1, temperature=0.7),
        gen,
        progress=False,
        overwrite=True,
    )
    assert sum(gen.requests.values()) == 2


def test_settings_validation():
    with pytest.raises(ValueError, match="max-attempts"):
        RolloutSettings(model="m", max_attempts=0)
    with pytest.raises(ValueError, match="top-p"):
        RolloutSettings(model="m", top_p=0)


def test_cli_help_mentions_offline(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "nothing is downloaded" in capsys.readouterr().out


def test_transformers_backend_with_tiny_model(tmp_path):
    """Real sampling: toy tokenizer + tiny random model from a local folder, chat-rendered prompts."""
    from opd.toy.models import build_tiny_model, save_model
    from opd.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer()
    model_dir = save_model(build_tiny_model(tok, seed=0), tok, tmp_path / "teacher")
    write_prompts(tmp_path / "p.parquet", 3)
    out = tmp_path / "o.jsonl"
    rc = main(
        [
            "--input",
            str(tmp_path / "p.parquet"),
            "--model",
            model_dir,
            "--output",
            str(out),
            "--n",
            "2",
            "--max-tokens",
            "8",
            "--backend",
            "transformers",
            "--no-progress",
            "--seed",
            "3",
        ]
    )
    assert rc == 0
    lines = read_jsonl(out)
    assert len(lines) == 6
    assert [int(ln["messages"][0]["content"][1]) for ln in lines] == [0, 0, 1, 1, 2, 2]
    # a random tiny model never writes \boxed: with rejection sampling every slot is abandoned after 2 attempts
    rc = main(
        [
            "--input",
            str(tmp_path / "p.parquet"),
            "--model",
            model_dir,
            "--output",
            str(tmp_path / "r.jsonl"),
            "--max-tokens",
            "8",
            "--backend",
            "transformers",
            "--no-progress",
            "--enable-rejection-sampling",
            "--max-attempts-per-rollout",
            "2",
        ]
    )
    summary = json.loads(summary_path(tmp_path / "r.jsonl").read_text())
    assert rc == 0 and summary["accepted"] == 0 and summary["abandoned_slots"] == 3
    assert summary["rejections"]["no_boxed"] == 6 and summary["attempts"] == 6


def test_backend_choice_without_vllm(monkeypatch):
    from opd.data import rollout_backends as rb

    real = rb.importlib.util.find_spec
    monkeypatch.setattr(rb.importlib.util, "find_spec", lambda name: None if name == "vllm" else real(name))
    assert rb.choose_backend("auto") == "transformers"
    with pytest.raises(ValueError, match="vllm is not installed"):
        rb.choose_backend("vllm")
    monkeypatch.setattr(rb.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(rb, "_cuda_available", lambda: True)
    assert rb.choose_backend("auto") == "vllm"
    monkeypatch.setattr(rb, "_cuda_available", lambda: False)
    assert rb.choose_backend("auto") == "transformers"


def test_worker_gpus_count_within_the_parents_visible_devices(monkeypatch):
    from opd.data import rollout_backends as rb

    assert rb.worker_gpus(["0", "1"], None) == ["0", "1"]
    assert rb.worker_gpus(["0", "1"], "4,6,7") == ["4", "6"]  # logical ids, as for any CUDA program
    assert rb.worker_gpus(None, "4,6") == ["4", "6"]
    with pytest.raises(ValueError, match="--gpus 3: CUDA_VISIBLE_DEVICES=4,6 makes GPUs 0..1 visible"):
        rb.worker_gpus(["3"], "4,6")
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert rb.worker_gpus(None, None) == ["0", "1", "2", "3"]  # every visible GPU, not just GPU 0


def test_part_record_without_prompt_index_is_a_data_error(tmp_path):
    from opd.data.rollout import read_parts
    from opd.data.schema import DataError

    (tmp_path / "worker-0.jsonl").write_text(
        '{"prompt_index": 0, "responses": []}\n{"responses": []}\n{"prompt_index": 2, "responses": []}\n'
    )
    with pytest.raises(DataError, match="worker-0.jsonl.*corrupt record on line 2"):
        read_parts(tmp_path)
