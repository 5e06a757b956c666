"""The demo's summary and before/after table, from synthetic metrics rows (fast; the end-to-end run is in
test_demo_smoke.py)."""

from __future__ import annotations

import pytest

from opd.cli import main as opd_main
from opd.demo import DemoConfig, build_summary, table


def _rows():
    rows = [{"step": 0, "val/toy_add/mean@1": 0.22, "val/mean@1": 0.22}]
    for s in (1, 2, 3):
        rows.append(
            {
                "step": s,
                "opd/overlap_ratio": 0.5 + 0.1 * s,
                "opd/top1_agreement": 0.9 + 0.02 * s,
                "opd/reverse_kl": 1.5 / s,
                "train/true_reward": 0.2 * s,
            }
        )
    rows[-1].update({"val/toy_add/mean@1": 0.51, "val/mean@1": 0.51})
    return rows


def test_summary_reads_first_and_last_values():
    secs = {"world": 1.0, "opd": 2.0}
    s = build_summary(DemoConfig(), _rows(), {"test_accuracy": 0.99}, {"steps": 5}, secs)
    assert s["accuracy_before_opd"] == 0.22 and s["accuracy_after_opd"] == 0.51
    assert s["accuracy_gain_points"] == pytest.approx(29.0)
    assert s["accuracy_curve"] == [(0, 0.22), (3, 0.51)]
    assert s["overlap_ratio_first_step"] == pytest.approx(0.6) and s["overlap_ratio_last_step"] == pytest.approx(0.8)
    assert s["first_last"]["opd/reverse_kl"] == {"first": 1.5, "last": 0.5, "first_step": 1, "last_step": 3}
    assert s["accuracy_metric"].startswith("val/toy_add/mean@1")
    secs["report"] = 3.0  # stages timed after the summary was built still land in it
    assert s["wall_seconds"]["report"] == 3.0
    text = table(s)
    assert "| student accuracy (test, greedy) | 0.220 | 0.510 |" in text
    assert (
        "| per-token reverse KL | 1.500 | 0.500 |" in text and "| teacher accuracy (test, greedy) | 0.990 | |" in text
    )


def test_tiny_config_and_help(capsys):
    t = DemoConfig.tiny(seed=3)
    assert t.seed == 3 and t.teacher_size == "tiny" and t.opd_steps < DemoConfig().opd_steps
    with pytest.raises(ValueError, match="opd_steps=0"):
        DemoConfig(opd_steps=0)
    with pytest.raises(ValueError, match="opd_lr"):
        DemoConfig(opd_lr=-1.0)
    with pytest.raises(ValueError, match="must not exceed n_train"):
        DemoConfig(n_train=100)
    assert opd_main(["demo", "--opd-steps", "0"]) == 2
    assert "DemoConfig.opd_steps=0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        opd_main(["demo", "--help"])
    assert exc.value.code == 0 and "--reuse-teacher" in capsys.readouterr().out
