"""Randomized kill tests: `opd train`, `opd sft` and `opd rollout` are SIGKILLed at seeded random points (after a
chosen step, record or file of a checkpoint write, plus a random delay; checkpoint writes pause so that some kills
land inside them), rerun each time with the same command (RESUME=auto / --resume auto / the same rollout), and
must end with exactly the metrics (every key but perf/* and times), logs, samples and weights of an uninterrupted
run. Tiny CPU models; the runs happen in subprocesses started by tests/reliability/kill_runner.py."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

from opd.cli import main as opd_main
from opd.engines.local import trainer
from opd.engines.local.config import config_yaml
from opd.engines.local.logging import read_metrics

RUNNER = Path(__file__).with_name("kill_runner.py")
KILLS = 3  # per command


def _engine_fixtures():
    path = Path(__file__).resolve().parents[1] / "engine" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_engine_conftest_kill", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_engine = _engine_fixtures()
toy_world, tiny_cfg = _engine.toy_world, _engine.tiny_cfg


def _kill_at(args: list[str], target: str, delay: float, events: Path, env: dict) -> int:
    """Start `opd args` under the runner, SIGKILL it `delay` s after it reports `target`; its return code."""
    events.write_text("")
    proc = subprocess.Popen(
        [sys.executable, str(RUNNER), str(events), "--", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while proc.poll() is None and target not in events.read_text().split("\n"):
        assert time.monotonic() < deadline, f"{target} never came"
        time.sleep(0.02)
    if proc.poll() is None:
        time.sleep(delay)
        proc.kill()
    _, err = proc.communicate()
    assert proc.returncode in (-9, 0), err[-2000:]
    return proc.returncode


def _kill_repeatedly(args: list[str], universe: list[str], seed: int, tmp_path: Path) -> list[str]:
    """Kill `opd args` KILLS times at seeded random points of `universe` (in the order they happen)."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(universe)), KILLS))
    env = {**os.environ, "KILL_TEST_SAVE_PAUSE": "0.4", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = []
    for k in chosen:
        delay = rng.uniform(0.0, 0.5)
        code = _kill_at(args, universe[k], delay, tmp_path / "events.txt", env)
        done.append(f"{universe[k]}+{delay:.2f}s:{code}")
    return done


def _timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and "time" not in k} for r in rows]


def _jsonl(path: Path, drop=()) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in path.read_text().splitlines()]


def test_train_killed_at_random_points_resumes_to_the_uninterrupted_run(tiny_cfg, tmp_path):
    settings = dict(total_steps=6, save_freq=2, test_freq=3, val_before_train=True, lr_scheduler="cosine")
    straight = trainer.train(tiny_cfg(output_dir=str(tmp_path / "ref"), **settings))
    cfg = tiny_cfg(output_dir=str(tmp_path / "killed"), **settings)
    (tmp_path / "run.yaml").write_text(config_yaml(cfg))
    universe = []
    for step in range(1, 7):
        universe.append(f"step:{step}")
        if step % 2 == 0:
            universe += [f"save:.tmp-step_{step:06d}:{name}" for name in ("optimizer.pt", "rng.pt")]
    kills = _kill_repeatedly(["train", "--config", str(tmp_path / "run.yaml")], universe, seed=12, tmp_path=tmp_path)

    resumed = trainer.train(cfg)  # RESUME=auto, as the kills' reruns
    assert _timeless(read_metrics(resumed)) == _timeless(read_metrics(straight)), kills
    for name in ("samples.jsonl", "profiles.jsonl"):
        assert (resumed / name).read_text() == (straight / name).read_text(), (name, kills)
    final = Path("checkpoints/step_000006/model/model.safetensors")
    assert (resumed / final).read_bytes() == (straight / final).read_bytes(), kills
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_000002", "step_000004", "step_000006"]
    assert yaml.safe_load((resumed / "config.yaml").read_text())["lr"] == cfg.lr


def test_sft_killed_at_random_points_resumes_to_the_uninterrupted_run(toy_world, tmp_path):
    from opd.toy import sample_problems, sft_messages

    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_messages(sample_problems(48, 0))))
    common = ["sft", "--model", toy_world["student"], "--data", str(data), "--steps", "12", "--batch-size", "8"]
    common += ["--lr", "1e-2", "--log-every", "1", "--max-length", "100", "--save-steps", "2", "--keep-last-n", "2"]
    assert opd_main([*common, "--output", str(tmp_path / "ref"), "--save-steps", "0"]) == 0
    out = tmp_path / "killed"
    universe = []
    for step in range(1, 12):
        universe.append(f"sftstep:{step}")
        if step % 2 == 0:
            universe.append(f"save:.tmp-step_{step:06d}:optimizer.pt")
    kills = _kill_repeatedly([*common, "--output", str(out)], universe, seed=7, tmp_path=tmp_path)

    assert opd_main([*common, "--output", str(out)]) == 0
    ref = tmp_path / "ref"
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes(), kills
    assert _jsonl(out / "sft_log.jsonl", drop=("elapsed_s",)) == _jsonl(ref / "sft_log.jsonl", drop=("elapsed_s",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "events.txt", "killed", "ref"]  # no litter


def test_rollout_killed_at_random_points_resumes_to_the_uninterrupted_run(toy_world, tmp_path):
    common = ["rollout", "--input", toy_world["train"], "--model", toy_world["teacher"], "--n", "2"]
    common += ["--max-tokens", "12", "--batch-prompts", "4", "--limit", "24", "--backend", "transformers"]
    common += ["--device", "cpu", "--dtype", "fp32", "--no-progress"]
    assert opd_main([*common, "--output", str(tmp_path / "ref.jsonl")]) == 0
    out = tmp_path / "killed.jsonl"
    universe = [f"record:{i}" for i in range(23)]
    kills = _kill_repeatedly([*common, "--output", str(out)], universe, seed=3, tmp_path=tmp_path)

    assert opd_main([*common, "--output", str(out)]) == 0
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes(), kills
    lines = out.read_text().splitlines()
    assert len(lines) == 48 and len(set(lines)) == len(lines)
