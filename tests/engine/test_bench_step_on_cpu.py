"""bench/bench_step.py runs `trainer.train_step`'s own pieces phase by phase: a one-step smoke run keeps it working
as the step changes (it restates nothing of the step, so this is all it needs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_step_under_test", BENCH / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "k,extra",
    [("-1", []), ("4", []), ("4", ["--shapes", "qwen3-0.6b:qwen3-0.6b", "--layers", "1", "--peak-tflops", "2"])],
    ids=["full", "topk", "qwen-shape"],
)
def test_bench_step_runs_the_train_step_pieces(monkeypatch, capsys, k, extra):
    module = _bench_step(monkeypatch)
    argv = ["--prompts", "2", "--n", "2", "--max-resp", "4", "--steps", "1", "--warmup", "0", "--k", k, *extra]
    assert module.main(argv) == 0
    table = capsys.readouterr().out
    for phase in ("rollout (sampling)", "student + teacher no-grad passes", "update (fwd+bwd+AdamW)", "whole step"):
        assert f"| {phase} |" in table
    assert "update: " in table and "model TFLOP/s" in table
    assert ("MFU" in table) == bool(extra)  # no peak is known for a CPU
    if extra:
        assert "student qwen3-0.6b (1 layers, d=1024)" in table
    sys.modules.pop("rss", None)
    sys.modules.pop("sizes", None)


def test_model_flops_count_the_body_at_every_token_and_the_head_at_the_responses(monkeypatch, tmp_path):
    module = _bench_step(monkeypatch)
    from opd.toy import build_toy_tokenizer

    tok = build_toy_tokenizer(tmp_path / "tok")
    model = sys.modules["sizes"].random_model(tok, "toy", "student", seed=0)
    V, H = model.get_output_embeddings().weight.shape
    every = sum(p.numel() for p in model.parameters())  # tied embeddings: the head's matrix is listed once
    assert module._model_flops(model, 100.0, 30.0, None) == (every - V * H) * 100.0 + V * H * 30.0
    assert module._model_flops(model, 100.0, 30.0, 200) == (every - V * H) * 100.0 + 200 * H * 30.0
    sys.modules.pop("rss", None)
    sys.modules.pop("sizes", None)
