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


def _load():
    spec = importlib.util.spec_from_file_location("bench_rewards_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_byte_and_flop_models_on_a_known_case():
    module = _load()
    V, T = 1000, 10  # 10,000 bf16 logits per tensor: 20,000 bytes each
    assert module.min_bytes("topk", V, T) == 40_000
    assert module.min_bytes("fullkl", V, T) == 40_000
    assert module.min_bytes("fullpg", V, T) == 60_000  # + the student's gradient written once
    assert module.min_bytes("fullpg_hidden", V, T) is None
    assert module.matmul_flops("topk", V, T) is None
    # 4 matmuls of 2 x T x V x H each
    assert module.matmul_flops("fullpg_hidden", V, T, H=8) == 4 * 2 * 10 * 1000 * 8
    assert module.matmul_flops("slots_hidden", V, T, H=8) == 640_000
    rate, pct = module._achieved("fullpg", V, T, {"seconds": 1e-3}, copy_bps=120e6)
    assert (rate, pct) == ("0.06 GB/s", "50.0%")
    rate, pct = module._achieved("slots_hidden", V, T, {"seconds": 1e-6}, copy_bps=120e6)
    assert (rate, pct) == ("81.9 TFLOP/s", "")  # the bench's H = 1024: 8 x 10 x 1000 x 1024 FLOPs in 1 us


def test_copy_bandwidth_is_positive_on_a_small_tensor():
    assert _load().copy_bandwidth("cpu", mib=1, repeats=2) > 0
