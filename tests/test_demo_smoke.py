"""`opd demo --tiny`: every stage of the embedded demo runs, and summary.json agrees with the run's metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from opd.cli import main as opd_main


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "opd").mkdir(parents=True)
    (out / "opd" / "stale.txt").write_text("from an earlier run")  # must not survive: nothing is reused
    assert opd_main(["demo", "--tiny", "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| student accuracy (test, greedy) |" in printed and "| before OPD" in printed
    assert not (out / "opd" / "stale.txt").exists()

    summary = json.loads((out / "summary.json").read_text())
    rows = _metrics(out / "opd" / "metrics.jsonl")
    acc = [(r["step"], r["val/toy_add/mean@1"]) for r in rows if r.get("val/toy_add/mean@1") is not None]
    overlap = [(r["step"], r["opd/overlap_ratio"]) for r in rows if r.get("opd/overlap_ratio") is not None]
    assert acc[0][0] == 0 and acc[-1][0] == summary["config"]["opd_steps"]
    assert summary["accuracy_before_opd"] == acc[0][1] and summary["accuracy_after_opd"] == acc[-1][1]
    assert summary["accuracy_gain_points"] == pytest.approx(100 * (acc[-1][1] - acc[0][1]))
    assert summary["overlap_ratio_first_step"] == overlap[0][1] and overlap[0][0] == 1
    assert summary["overlap_ratio_last_step"] == overlap[-1][1]
    assert 0 <= summary["overlap_ratio_first_step"] <= 1
    assert summary["first_last"]["opd/top1_agreement"]["last_step"] == summary["config"]["opd_steps"]
    secs = summary["wall_seconds"]
    assert set(secs) == {"world", "teacher_sft", "student_cold_start", "opd", "report", "total"}
    assert all(v > 0 for v in secs.values())
    assert secs["total"] >= sum(v for k, v in secs.items() if k != "total")
    cold = summary["cold_start"]
    assert cold["rollouts"] == summary["config"]["cold_rollouts"] == cold["kept"] + cold["rejected_no_box"]
    assert 0 <= summary["teacher_accuracy"] <= 1

    report = out / "report"
    for name in ("report.md", "headline.png", "report_summary.json", "scalars_opd.png"):
        assert (report / name).is_file(), name
    assert "Before / after OPD" in (report / "report.md").read_text()
    for stage in ("teacher", "student_cold"):
        assert (out / stage / "config.json").is_file() and (out / stage / "tokenizer.json").is_file()
    for split in ("train", "dev", "test"):
        assert (out / "data" / f"{split}.parquet").is_file()

    # --reuse-teacher keeps the same teacher (same settings) instead of training it again
    teacher_weights = (out / "teacher" / "model.safetensors").read_bytes()
    assert opd_main(["demo", "--tiny", "--out", str(out), "--threads", "1", "--reuse-teacher"]) == 0
    assert "reusing the saved teacher" in capsys.readouterr().out
    assert (out / "teacher" / "model.safetensors").read_bytes() == teacher_weights
