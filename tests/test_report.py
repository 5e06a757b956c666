"""`opd report`: plots and summary drawn from metrics.jsonl / profiles.jsonl after training."""

from __future__ import annotations

import json
import re

import pytest

from opd.cli import main as opd_main
from opd.report import group_of, group_panels, read_jsonl, scalar_series, write_report


def _run(tmp_path, with_profiles=True):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "val/toy_add/mean@1": 0.2, "val/mean@1": 0.2}]
    for s in range(1, 6):
        rows.append(
            {
                "step": s,
                "opd/overlap_ratio": 0.3 + 0.1 * s,
                "opd/top1_agreement": 0.9,
                "opd/reverse_kl": 1.0 / s,
                "train/true_reward": 0.1 * s,
                "actor/loss": None if s == 3 else -s,
                "opd/pos/0-255/overlap_ratio": 0.5,
                "opd/pos/256+/overlap_ratio": 0.4,
                "opd/pos/0-255/reverse_kl": 0.2,
            }
        )
    rows.append({"step": 5, "val/toy_add/mean@1": 0.6, "val/mean@1": 0.6})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if with_profiles:
        profs = [
            {
                "step": s,
                "position": [0.0, 1.0, 2.0],
                "tokens": [4.0, 4.0, 2.0],
                "overlap_ratio": [0.1 * s, float("nan"), 0.3],
                "reverse_kl": [1.0, 0.5, 0.2],
            }
            for s in (1, 5)
        ]
        (run / "profiles.jsonl").write_text("".join(json.dumps(p) + "\n" for p in profs))
    return run


def test_series_skip_nulls_and_sort_by_step():
    rows = [{"step": 2, "a": 1.0, "b": None}, {"step": 1, "a": 3, "flag": True, "name": "x"}]
    s = scalar_series(rows)
    assert s == {"a": ([1, 2], [3.0, 1.0])}


def test_report_files_and_summary_match_metrics(tmp_path):
    run = _run(tmp_path)
    report = write_report(run, title="T", extra_markdown="EXTRA SECTION")
    out = run / "report"
    text = report.read_text()
    assert text.startswith("# T") and "EXTRA SECTION" in text
    for img in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (out / img).stat().st_size > 1000
    names = {p.name for p in out.glob("*.png")}
    assert {
        "headline.png",
        "profiles.png",
        "scalars_opd.png",
        "scalars_pos.png",
        "scalars_actor.png",
        "scalars_train.png",
        "scalars_val.png",
    } <= names
    summary = json.loads((out / "report_summary.json").read_text())
    assert summary["val/toy_add/mean@1"] == {
        "first_step": 0,
        "first": 0.2,
        "last_step": 5,
        "last": 0.6,
        "min": 0.2,
        "max": 0.6,
    }
    assert summary["opd/overlap_ratio"]["first"] == pytest.approx(0.4)
    assert summary["opd/overlap_ratio"]["last"] == pytest.approx(0.8)
    assert summary["actor/loss"]["min"] == -5 and summary["actor/loss"]["max"] == -1  # the null step is skipped
    # headline table row for the overlap ratio: first (step) and last (step)
    assert re.search(r"\| `opd/overlap_ratio` \| 0\.4 \(1\) \| 0\.8 \(5\) \|", text)
    assert not list(out.glob(".*"))  # no temp files left


def test_position_windows_are_grouped_per_statistic(tmp_path):
    keys = ["opd/pos/0-255/overlap_ratio", "opd/pos/256+/overlap_ratio", "opd/pos/0-255/reverse_kl"]
    assert {group_of(k) for k in keys} == {"pos"} and group_of("opd/overlap_ratio") == "opd"
    series = {k: ([1], [0.0]) for k in keys}
    panels = dict(group_panels("pos", keys, series))
    assert set(panels) == {"opd/overlap_ratio", "opd/reverse_kl"}
    assert set(panels["opd/overlap_ratio"]) == {"positions 0-255", "positions 256+"}


def test_cli_and_errors(tmp_path, capsys):
    run = _run(tmp_path, with_profiles=False)
    assert opd_main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists() and not (tmp_path / "rep" / "profiles.png").exists()
    assert opd_main(["report", str(tmp_path / "nope")]) == 1  # bad input: 1 (opd.errors)
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{broken\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_jsonl(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text('{"a": 1}\n')
    assert opd_main(["report", str(run)]) == 1
    assert "row has no 'step'" in capsys.readouterr().err
