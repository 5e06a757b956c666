"""The shipped example config reproduces the demo's OPD stage, so `opd train --config configs/local/toy_opd.yaml`
after `opd demo` reruns exactly what the demo measured (the two drifted apart once)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from opd.demo import DemoConfig, opd_train_config
from opd.engines.local.config import from_yaml

ROOT = Path(__file__).resolve().parents[2]
# where the run is written and how often it is saved are the user's business, not the algorithm's
PLUMBING = {"output_dir", "run_name", "resume", "save_freq"}


def test_toy_opd_yaml_matches_the_demo_opd_stage():
    example = asdict(from_yaml(ROOT / "configs/local/toy_opd.yaml"))
    out = Path("demo_out")
    demo = asdict(opd_train_config(DemoConfig(), out, {"train": out / "data/train.parquet",
                                                       "test": out / "data/test.parquet"}))
    differ = {k: (example[k], demo[k]) for k in demo if k not in PLUMBING and example[k] != demo[k]}
    assert not differ, f"configs/local/toy_opd.yaml differs from the demo's OPD stage (yaml, demo): {differ}"
