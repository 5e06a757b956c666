"""`opd lab` as a user runs it: the machinery end to end on tiny settings (cache reuse included), refusals of bad
settings, and the `--quick` smoke run on the real settings (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.cli import main as opd_main


def _result_files(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("*/*/result.json")}


def test_tiny_lab_runs_every_stage_writes_the_report_and_reuses_its_cache(tmp_path, capsys):
    out = tmp_path / "lab"
    assert opd_main(["lab", "--tiny", "--workers", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert set(summary["verdicts"]) == {"a", "b", "c"}
    report = (out / "report" / "report.md").read_text()
    for key in ("(a)", "(b)", "(c)"):
        assert f"| {key} |" in report
    assert (out / "report" / "lab.png").stat().st_size > 10_000
    kinds = {Path(k).parts[0] for k in _result_files(out)}
    assert kinds == {"world", "models", "runs", "checks"}
    # each OPD run validated before its first step and after its last, in both templates
    run = summary["seeds"][0]["runs"]["compatible"]
    assert [s for s, _ in run["val/lab_what_is/mean@1"]][:1] == [0]
    assert len(run["val/lab_sum_of/mean@1"]) >= 2
    first = _result_files(out)
    assert opd_main(["lab", "--tiny", "--workers", "1", "--out", str(out)]) == 0
    assert _result_files(out) == first  # nothing retrained or rerun


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--seeds", "100"], "calibration seed"),
        (["--seeds", "1,x"], "--seeds='1,x'"),
        (["--seeds", "1,1"], "distinct"),
        (["--workers", "0"], "workers=0"),
    ],
)
def test_bad_settings_are_refused_in_one_line(tmp_path, capsys, args, needle):
    out = tmp_path / "lab"
    assert opd_main(["lab", "--tiny", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("opd lab: ") and needle in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_quick_lab_trains_the_world_and_judges_a_to_c(tmp_path):
    """The smoke run on the real settings: the teachers learn their patterns with real entropy, the student is weak,
    and the three verdicts come out (whatever they are: the lab reports, it does not promise)."""
    out = tmp_path / "lab"
    assert opd_main(["lab", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert set(summary["verdicts"]) == {"a", "b", "c"}
    models = {p.parent.name.rsplit("-", 1)[0]: json.loads(p.read_text()) for p in out.glob("models/*/result.json")}
    for pattern in ("columns", "partial"):
        assert models[f"teacher_{pattern}"]["accuracy"]["what_is"] >= 0.9
    assert models["teacher_columns"]["entropy"] >= 0.3  # the ambiguity is learnt (the partial pattern's cap is 0.24)
    assert models["teacher_partial"]["entropy"] >= 0.2
    student = next(v for k, v in models.items() if k.startswith("student_s"))
    assert student["accuracy"]["what_is"] < 0.6
