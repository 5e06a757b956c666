"""bench/bench_step.py runs `trainer.train_step`'s own pieces phase by phase: a one-step smoke run keeps it working
as the step changes (it restates nothing of the step, so this is all it needs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("k", ["-1", "4"])
def test_bench_step_runs_the_train_step_pieces(monkeypatch, capsys, k):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_step_under_test", BENCH / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--prompts", "2", "--n", "2", "--max-resp", "4", "--steps", "1", "--warmup", "0", "--k", k]
    assert module.main(argv) == 0
    table = capsys.readouterr().out
    for phase in ("rollout (sampling)", "student + teacher no-grad passes", "update (fwd+bwd+AdamW)", "whole step"):
        assert f"| {phase} |" in table
    sys.modules.pop("rss", None)
