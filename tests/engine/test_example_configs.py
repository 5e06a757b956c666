"""The toy recipe is written once (the preset toy_opd): the demo's OPD stage resolves to exactly the configuration it
was measured with, and configs/local/toy_opd.yaml, which names the preset, reruns that stage after `opd demo`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from opd.core.config import OPDConfig
from opd.demo import DemoConfig, opd_train_config
from opd.engines.local.config import TrainConfig, from_yaml

ROOT = Path(__file__).resolve().parents[2]
OUT = Path("demo_out")
PATHS = {"train": OUT / "data/train.parquet", "test": OUT / "data/test.parquet"}
# where the run is written and how often it is saved are the user's business, not the algorithm's
PLUMBING = {"output_dir", "run_name", "resume", "save_freq"}


def _measured(cfg: DemoConfig) -> TrainConfig:
    """The demo's OPD stage as written out before the preset existed (the configuration docs/demo.md measured)."""
    return TrainConfig(
        actor_model_path=str(OUT / "student_cold"),
        reward_model_path=str(OUT / "teacher"),
        train_dataset=str(PATHS["train"]),
        test_files=[str(PATHS["test"])],
        max_prompt_length=64,
        max_resp_length=cfg.max_resp_length,
        max_val_resp_length=cfg.max_resp_length,
        n_responses=cfg.opd_n,
        mini_batch_size=cfg.opd_prompts,
        rollout_batch_size=512,
        val_n=1,
        val_temperature=0.0,
        val_top_p=1.0,
        val_before_train=True,
        test_freq=cfg.test_freq,
        lr=cfg.opd_lr,
        lr_scheduler="constant",
        total_steps=cfg.opd_steps,
        save_freq=cfg.opd_steps,
        seed=cfg.seed,
        output_dir=str(OUT),
        run_name="opd",
        resume="off",
        algo=OPDConfig(
            top_k=cfg.top_k,
            top_k_strategy="only_stu",
            reward_weight_mode="student_p",
            tail_bucket=cfg.tail_bucket and cfg.top_k > 0,
        ),
    )


def test_demo_opd_stage_resolves_to_the_measured_config():
    knobs = DemoConfig()
    assert (
        knobs.opd_steps,
        knobs.opd_lr,
        knobs.opd_prompts,
        knobs.opd_n,
        knobs.top_k,
        knobs.tail_bucket,
        knobs.test_freq,
        knobs.max_resp_length,
    ) == (150, 6e-4, 32, 4, 16, True, 25, 48)
    for cfg in (DemoConfig(), DemoConfig.tiny(), DemoConfig(seed=3, top_k=0, opd_lr=1e-3)):
        assert opd_train_config(cfg, OUT, PATHS) == _measured(cfg)


def test_toy_opd_yaml_matches_the_demo_opd_stage():
    example = asdict(from_yaml(ROOT / "configs/local/toy_opd.yaml"))
    demo = asdict(opd_train_config(DemoConfig(), OUT, PATHS))
    differ = {k: (example[k], demo[k]) for k in demo if k not in PLUMBING and example[k] != demo[k]}
    assert not differ, f"configs/local/toy_opd.yaml differs from the demo's OPD stage (yaml, demo): {differ}"
