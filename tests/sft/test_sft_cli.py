"""`opd sft` end to end on a tiny model: reads rollout JSONL/parquet, trains, saves atomically; clear input errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from opd.cli import main as opd_main
from opd.sft.cli import read_conversations
from opd.toy import build_tiny_model, build_toy_tokenizer, sample_problems, save_model, sft_messages


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_toy_tokenizer()
    return save_model(build_tiny_model(tok, "tiny", seed=0), tok, tmp_path_factory.mktemp("m") / "model")


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_opd_sft_trains_and_saves(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = _write_jsonl(tmp_path / "rollouts.jsonl", sft_messages(sample_problems(64, 0)))
    out = tmp_path / "out"
    rc = opd_main(
        [
            "sft",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--output",
            str(out),
            "--steps",
            "12",
            "--batch-size",
            "16",
            "--micro-batch-size",
            "8",
            "--lr",
            "1e-2",
            "--log-every",
            "4",
            "--max-length",
            "100",
        ]
    )
    assert rc == 0
    log = [json.loads(line) for line in (out / "sft_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 12] and log[-1]["loss"] < log[0]["loss"]
    AutoModelForCausalLM.from_pretrained(out)
    assert (out / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    # refuses to overwrite by default
    assert opd_main(["sft", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "1"]) == 2


def test_read_conversations_parquet_and_errors(tmp_path):
    recs = sft_messages(sample_problems(3, 0))
    pq = tmp_path / "d.parquet"
    pd.DataFrame(recs).to_parquet(pq)
    assert read_conversations(pq) == [r["messages"] for r in recs]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(recs[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl', row 1: invalid JSON on line 2"):
        read_conversations(bad)
    _write_jsonl(bad, [recs[0], {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl', row 1, column 'messages': no assistant"):
        read_conversations(bad)
    _write_jsonl(bad, [{"conversation": []}])
    with pytest.raises(ValueError, match=r"bad.jsonl', row 0, column 'messages': no 'messages' column/key"):
        read_conversations(bad)
    pd.DataFrame({"text": ["x"]}).to_parquet(pq)
    with pytest.raises(ValueError, match="row 0, column 'messages': no 'messages' column"):
        read_conversations(pq)


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exc:
        opd_main(["sft", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0 and "assistant tokens only" in out and "Nothing is downloaded" in out


def test_cli_errors_are_one_line_and_leave_no_output(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "out"
    # bad input exits 1, a bad option 2 (opd.errors)
    assert opd_main(["sft", "--model", str(model_dir), "--data", str(bad), "--output", str(out)]) == 1
    assert "bad.jsonl', row 0, column 'messages': no assistant" in capsys.readouterr().err
    assert (
        opd_main(["sft", "--model", str(model_dir), "--data", str(tmp_path / "nope.jsonl"), "--output", str(out)]) == 1
    )
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    good = _write_jsonl(tmp_path / "good.jsonl", sft_messages(sample_problems(2, 0)))
    assert opd_main(["sft", "--model", str(model_dir), "--data", str(good), "--output", str(out), "--lr", "-1"]) == 2
    assert "lr" in capsys.readouterr().err
    # an id that is not a local folder nor in the (offline) cache: an error, not a download
    assert opd_main(["sft", "--model", "no-such-org/no-such-model", "--data", str(good), "--output", str(out)]) == 1
    assert "no such folder, nor a model id in the Hugging Face cache" in capsys.readouterr().err
    assert not out.exists()
