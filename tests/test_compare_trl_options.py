"""bench/compare_trl.py's options (shapes, device, dtype, prompts, new tokens) without TRL (CI does not install it):
the parsing, the spec every worker gets, the toy world (models bit-identical to the toy builder the published
tables used) and our side of a step at a non-default prompt / token count."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def compare_trl(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("compare_trl_under_test", BENCH / "compare_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "trl" not in module.__dict__  # TRL stays a lazy import of the driver and the TRL workers
    yield module
    for name in ("rss", "sizes"):
        sys.modules.pop(name, None)


def test_defaults_keep_the_published_settings(compare_trl):
    args = compare_trl.build_parser().parse_args([])
    assert (args.shapes, args.layers, args.vocab) == ("toy", None, "toy,151936")
    assert compare_trl.worker_options(args) == {"device": "cpu", "dtype": "fp32", "prompts": 8, "new_tokens": 32}


def test_options_reach_the_worker_spec(compare_trl):
    argv = ["--device", "cuda", "--dtype", "bf16", "--shapes", "qwen3-1.7b:qwen3-0.6b", "--vocab", "151936"]
    args = compare_trl.build_parser().parse_args(argv + ["--prompts", "64", "--new-tokens", "256", "--layers", "2"])
    assert compare_trl.worker_options(args) == {"device": "cuda", "dtype": "bf16", "prompts": 64, "new_tokens": 256}
    assert (args.shapes, args.layers) == ("qwen3-1.7b:qwen3-0.6b", 2)


@pytest.mark.parametrize("argv", [["--shapes", "qwen9"], ["--dtype", "fp16"], ["--device", "mps"]])
def test_bad_options_stop_before_any_work(compare_trl, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        compare_trl.main(argv)
    assert exc.value.code == 2  # argparse's usage error, raised before the driver imports torch / TRL
    assert argv[1] in capsys.readouterr().err


def test_title_names_the_models(compare_trl):
    toy = {"student": ("Llama-style", 2, 64), "teacher": ("Llama-style", 3, 64)}
    assert compare_trl.describe_models(toy) == "Llama-style student (2 layers, d=64) <- teacher (3 layers, d=64)"
    real = {"student": ("qwen3-0.6b-shaped", 1, 1024), "teacher": ("qwen3-1.7b-shaped", 28, 2048)}
    assert compare_trl.describe_models(real) == (
        "qwen3-0.6b-shaped student (1 layer, d=1024) <- qwen3-1.7b-shaped teacher (28 layers, d=2048)"
    )


def _toy_model_before_sizes(tokenizer, role: str, seed: int):
    """compare_trl's own builder before bench/sizes.py (the published tables' models)."""
    import torch
    from transformers import LlamaForCausalLM

    from opd.toy import tiny_config

    config = tiny_config(tokenizer, size=role, arch="llama")
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(torch.float32)


def test_toy_world_and_our_step_at_other_counts(compare_trl, tmp_path):
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world = compare_trl.build_world(tmp_path, ["toy"], "toy", layers=1, prompts=3)  # layers: real shapes only
    assert len(pd.read_parquet(world["train"])) == 3
    assert world["describe"] == {"student": ("Llama-style", 2, 64), "teacher": ("Llama-style", 3, 64)}
    models = world["models"]["toy"]
    tok = AutoTokenizer.from_pretrained(models["student"])
    for role, seed in compare_trl.SEEDS.items():
        saved = AutoModelForCausalLM.from_pretrained(models[role], dtype=torch.float32).state_dict()
        before = _toy_model_before_sizes(tok, role, seed).state_dict()
        assert saved.keys() == before.keys()
        assert all(torch.equal(saved[k], before[k]) for k in saved), role

    spec = {"student": models["student"], "teacher": models["teacher"], "train": world["train"]}
    spec |= {"warmup": 0, "steps": 1, "k": 16, "device": "cpu", "dtype": "fp32", "prompts": 3, "new_tokens": 4}
    res = compare_trl.run_ours(spec)
    assert res["gen_tokens"] == 12 and len(res["times"]) == 1
    assert res["scored_tokens"] > res["gen_tokens"] and res["peak_mb"] > 0
