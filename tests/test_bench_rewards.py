"""bench/bench_rewards.py: each path's chunked and naive implementations agree on a small case (the script's own
`agree` column), so a table it prints compares equal computations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_rewards.py"


@pytest.mark.parametrize("path", ["topk", "fullkl", "fullpg", "fullpg_hidden", "slots_hidden"])
def test_chunked_and_naive_agree_on_a_small_case(path):
    spec = importlib.util.spec_from_file_location("bench_rewards_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    chunked, naive = (module._run_case(path, impl, 97, 24, 4, 5, "cpu") for impl in ("chunked", "naive"))
    assert chunked["checksum"] == pytest.approx(naive["checksum"], rel=1e-4, abs=1e-4)
    assert chunked["checksum"] != 0
