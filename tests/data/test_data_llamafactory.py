"""LlamaFactory export: dataset_info entry named after the file, strict line checks, YAML filled in; and, when a
LlamaFactory environment is available, its own loader reads the export with our shipped YAML."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd.data import llamafactory as lf
from opd.data.schema import DataError

HERE = Path(__file__).parent


def write_rollouts(path, n=20):
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {i}+{i}? Put the answer in \\boxed{{}}."},
                            {"role": "assistant", "content": f"{i}+{i}={2 * i}, so \\boxed{{{2 * i}}}."},
                        ]
                    }
                )
                + "\n"
            )
    return path


def test_export_registers_name_matching_file(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "other.json"}}))
    target, n = lf.export(write_rollouts(tmp_path / "qwen3_4b_answers.jsonl"), ds)
    assert n == 20 and target == ds / "qwen3_4b_answers.jsonl"
    assert target.read_bytes() == (tmp_path / "qwen3_4b_answers.jsonl").read_bytes()
    info = json.loads((ds / "dataset_info.json").read_text())
    assert set(info) == {"other", "qwen3_4b_answers"}  # existing entries kept
    entry = info["qwen3_4b_answers"]
    assert entry["file_name"] == "qwen3_4b_answers.jsonl" and entry["formatting"] == "sharegpt"
    assert entry["columns"] == {"messages": "messages"} and entry["tags"]["assistant_tag"] == "assistant"
    lf.export(target, ds, name="qwen3_4b_answers")  # re-export in place: idempotent
    assert target.read_bytes() == (tmp_path / "qwen3_4b_answers.jsonl").read_bytes()


@pytest.mark.parametrize(
    "bad,msg",
    [
        ({"messages": [{"role": "assistant", "content": "x"}]}, "turn 0 should be a user"),
        ({"messages": [{"role": "user", "content": "q"}]}, "end with a non-empty assistant"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
            "non-empty assistant",
        ),
        ({"conversations": []}, "'messages' list"),
    ],
)
def test_bad_line_is_named(tmp_path, bad, msg):
    path = write_rollouts(tmp_path / "r.jsonl", 3)
    with open(path, "a") as f:
        f.write(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=msg) as e:
        lf.export(path, tmp_path / "ds")
    assert "row 3" in str(e.value) and "r.jsonl" in str(e.value)
    assert not (tmp_path / "ds" / "dataset_info.json").exists()


def test_shipped_yaml_has_paper_settings():
    cfg = yaml.safe_load(lf.default_yaml().read_text())
    assert cfg["template"] == "qwen3" and cfg["enable_thinking"] is True and cfg["finetuning_type"] == "full"
    assert cfg["cutoff_len"] == 14336 and cfg["learning_rate"] == 1e-5 and cfg["lr_scheduler_type"] == "cosine"
    assert cfg["warmup_ratio"] == 0.05 and cfg["num_train_epochs"] == 2 and cfg["val_size"] == 0.05
    assert cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"] * 8 == 64 and cfg["bf16"]
    assert cfg["disable_gradient_checkpointing"] is False
    ds = json.loads((lf.default_yaml().parent / Path(cfg["deepspeed"]).name).read_text())
    assert ds["zero_optimization"]["stage"] == 2


def export_with_yaml(tmp_path):
    rollouts = write_rollouts(tmp_path / "cold_start.jsonl")
    rc = lf.main(
        [
            "--rollouts",
            str(rollouts),
            "--dataset-dir",
            str(tmp_path / "ds"),
            "--yaml-out",
            str(tmp_path / "sft.yaml"),
            "--output-dir",
            str(tmp_path / "ckpt"),
        ]
    )
    assert rc == 0
    return yaml.safe_load((tmp_path / "sft.yaml").read_text())


def test_cli_yaml_points_at_export(tmp_path):
    cfg = export_with_yaml(tmp_path)
    assert cfg["dataset"] == "cold_start" and Path(cfg["dataset_dir"]) == (tmp_path / "ds").resolve()
    assert (Path(cfg["dataset_dir"]) / "cold_start.jsonl").is_file()
    assert Path(cfg["deepspeed"]).is_file() and cfg["output_dir"] == str(tmp_path / "ckpt")
    assert cfg["model_name_or_path"] == "Qwen/Qwen3-1.7B-Base"  # kept when not given


def _llamafactory_python() -> list[str] | None:
    if importlib.util.find_spec("llamafactory") is not None:
        return [sys.executable]
    exe = os.environ.get("OPD_LLAMAFACTORY_PYTHON")  # e.g. /path/to/lf-venv/bin/python
    return [exe] if exe else None


@pytest.mark.slow
def test_llamafactory_loader_reads_export(tmp_path):
    python = _llamafactory_python()
    if python is None:
        pytest.skip(
            "no LlamaFactory environment: scripts/test.sh builds .venv-llamafactory (see "
            ".venv-llamafactory.log if it failed), or set OPD_LLAMAFACTORY_PYTHON to the python of one"
        )
    from opd.toy.models import build_tiny_model, save_model
    from opd.toy.tokenizer import build_toy_tokenizer

    export_with_yaml(tmp_path)
    tok = build_toy_tokenizer()
    model_dir = save_model(build_tiny_model(tok, arch="qwen2"), tok, tmp_path / "student")
    proc = subprocess.run(
        [*python, str(HERE / "lf_load_check.py"), str(tmp_path / "sft.yaml"), model_dir, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LF_RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    rows = json.loads(line[0][len("LF_RESULT ") :])
    assert sum(r["split"] == "train_dataset" for r in rows) == 19 and len(rows) == 20  # 5% validation split
    for r in rows:
        i = int(r["input"].split("What is ")[1].split("+")[0])
        assert f"What is {i}+{i}?" in r["input"]
        # qwen3 template, thinking on: an empty think block is trained before the answer, the prompt is masked
        assert r["target"].startswith("<think>\n\n</think>\n\n") and f"so \\boxed{{{2 * i}}}." in r["target"]
        assert "What is" not in r["target"]
