"""The lab's plan: who depends on whom (read off the model folders each job reads), and the start order."""

from __future__ import annotations

from pathlib import Path

from opd.lab.config import LabConfig
from opd.lab.plan import ALL_PAIRS, QUICK_PAIRS, blocked_by, jobs, key, needs


def _deps(cfg, names):
    lab = Path("/nonexistent/lab")
    plan = jobs(cfg, lab, names)
    return plan, {key(j): needs(j, plan, lab) for j in plan}


def test_every_job_waits_for_exactly_the_models_it_reads():
    plan, deps = _deps(LabConfig().quick(), QUICK_PAIRS)
    assert len(plan) == 4 + 2 * len(QUICK_PAIRS)  # 2 teachers, student, cold start; an OPD run and a check per pair
    assert deps["sft:teacher_columns"] == deps["sft:teacher_partial"] == deps["sft:student_s0"] == set()
    assert deps["sft:student_cold_s0"] == {"sft:student_s0", "sft:teacher_partial"}
    assert deps["opd:compatible_s0"] == deps["check:compatible_s0"] == {"sft:student_s0", "sft:teacher_columns"}
    assert deps["opd:cold_start_s0"] == {"sft:student_cold_s0", "sft:teacher_partial"}


def test_teachers_are_shared_by_the_seeds_and_the_student_unblocks_most():
    cfg = LabConfig()
    plan, deps = _deps(cfg, ALL_PAIRS)
    assert len(plan) == 2 + len(cfg.seeds) * (3 + 2 * len(ALL_PAIRS))
    counts = blocked_by(deps)
    # student_s0: its cold start, and OPD run + check of every pair of its seed (the cold pair through the cold start)
    assert counts["sft:student_s0"] == 1 + 2 * len(ALL_PAIRS)
    assert counts["sft:teacher_columns"] == len(cfg.seeds) * 2 * 2  # compatible and misaligned, run + check
    assert counts["opd:compatible_s0"] == 0


def test_blocked_by_counts_every_job_downstream_once():
    deps = {"a": set(), "b": {"a"}, "c": {"a", "b"}, "d": {"c"}}
    assert blocked_by(deps) == {"a": 3, "b": 2, "c": 1, "d": 0}
