"""bench/gpu_figures.sh is run on a lent GPU with no time to debug it there: its SMOKE mode runs the same three
benchmark commands on the CPU at toy sizes, so a change to a script's options breaks this test, not a GPU lease."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_figures_script_runs_its_benchmarks_in_smoke_mode(tmp_path):
    env = dict(os.environ, SMOKE="1", OUT_DIR=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_figures.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rewards, step, trl = (
        (tmp_path / f"{name}.md").read_text() for name in ("bench_rewards", "bench_step", "compare_trl")
    )
    assert "device copy bandwidth" in rewards and "| slots_hidden |" in rewards
    assert "student qwen3-0.6b (1 layers, d=1024)" in step and "update: " in step
    assert "| ours K=16 |" in trl or "side-by-side step with TRL is skipped" in trl
