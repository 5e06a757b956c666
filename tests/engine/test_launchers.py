"""The launchers: every documented variable reaches the resolved config, the ${VAR:-default}s equal the presets (the
one check that keeps the two copies equal), the environment and extra arguments win, a YAML beats the launcher's
defaults, ENGINE=verl fails clearly, no debug settings are left on (CPU, no models)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd.engines.local.config import ENV_VARS, TrainConfig, from_yaml, resolve
from opd.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]
OPD_SH = ROOT / "on_policy_distillation.sh"
GRPO_SH = ROOT / "grpo.sh"
EXPORT = re.compile(r'^export (\w+)="\$\{(\w+):-(.*)\}"$')

# A non-default value for every launcher variable (a new variable without one here fails the coverage test).
NON_DEFAULT = {
    "ADV_ESTIMATOR": ("token_reward_direct_plus_grpo", "token_reward_direct_plus_grpo"),
    "ACTOR_MODEL_PATH": ("/m/student", "/m/student"),
    "REWARD_MODEL_PATH": ("/m/teacher", "/m/teacher"),
    "N_RESPONSES": ("3", 3),
    "MINI_BATCH_SIZE": ("7", 7),
    "MAX_PROMPT_LENGTH": ("77", 77),
    "MAX_RESP_LENGTH": ("55", 55),
    "MAX_VAL_RESP_LENGTH": ("66", 66),
    "LOG_PROB_TOP_K": ("5", 5),
    "TOP_K_STRATEGY": ("union-intersection", "union-intersection"),
    "REWARD_WEIGHT_MODE": ("teacher_p", "teacher_p"),
    "TEMPERATURE": ("0.9", 0.9),
    "TEACHER_TEMPERATURE": ("1.5", 1.5),
    "REPETITION_PENALTY": ("1.1", 1.1),
    "LR": ("3e-4", 3e-4),
    "LR_SCHEDULER": ("cosine", "cosine"),
    "USE_KL": ("True", True),
    "ENABLE_FORMAT_REWARD": ("true", True),
    "LOSS_AGG_MODE": ("seq-mean-token-sum-norm", "seq-mean-token-sum-norm"),
    "POLICY_LOSS": ("importance_sampling", "importance_sampling"),
    "MODEL_DTYPE": ("bf16", "bf16"),
    "GRPO_OUTCOME_WEIGHT": ("0.25", 0.25),
    "TRAIN_DATASET": ("/d/train.parquet", "/d/train.parquet"),
    "TEST_FILE": ("/d/a.parquet,/d/b.parquet", ["/d/a.parquet", "/d/b.parquet"]),
    "ENABLE_THINKING": ("False", False),
    "SAVE_FREQ": ("5", 5),
    "KEEP_LAST_N": ("3", 3),
    "TEST_FREQ": ("6", 6),
    "TOTAL_EPOCHS": ("3", 3),
    "TOTAL_STEPS": ("9", 9),
    "RESUME": ("off", "off"),
    "OUTPUT_DIR": ("/o", "/o"),
    "RUN_NAME": ("my-run", "my-run"),
    "SEED": ("11", 11),
    "TOP_P": ("0.8", 0.8),
    "VAL_N": ("4", 4),
    "VAL_TEMPERATURE": ("0.6", 0.6),
    "VAL_TOP_P": ("0.9", 0.9),
    "VAL_BEFORE_TRAIN": ("False", False),
    "MICRO_BATCH_TOKENS": ("999", 999),
    "ROLLOUT_BATCH_SIZE": ("13", 13),
    "DEVICE": ("cpu", "cpu"),
    "TEACHER_DTYPE": ("bf16", "bf16"),
    "GRADIENT_CHECKPOINTING": ("True", True),
}


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k not in ("ENGINE", "PRESET")}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _print_config(script: Path, env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run(
        ["bash", str(script), *args, "--print-config"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def _get(resolved: dict, key: str):
    if key.startswith("algo."):
        return resolved["algo"][key[len("algo.") :]]
    return resolved[key]


def _launcher_blocks(script: Path) -> dict[str, dict[str, str]]:
    """{preset: {VAR: default text}}: the exports under a preset's label of the PRESET case, and (opd) the rest."""
    blocks, current = {"opd": {}}, "opd"
    for line in script.read_text().splitlines():
        label = re.fullmatch(r"\s*(\w+)\)", line)
        if label and label[1] in PRESETS:
            current = label[1]
            blocks[current] = {}
        elif line.strip() == ";;":
            current = "opd"
        elif m := EXPORT.match(line.strip()):
            assert m.group(1) == m.group(2), f"{script.name}: {line!r} exports one name from another"
            blocks[current][m.group(1)] = m.group(3)
    return blocks


def test_every_variable_has_a_non_default_test_value():
    assert set(NON_DEFAULT) == set(ENV_VARS)
    defaults = TrainConfig().to_dict()
    for var, (_, typed) in NON_DEFAULT.items():
        assert typed != _get(defaults, ENV_VARS[var]), f"{var}: the test value equals the default"


def test_every_launcher_variable_reaches_the_resolved_config():
    env = _clean_env(**{var: text for var, (text, _) in NON_DEFAULT.items()})
    resolved = _print_config(OPD_SH, env)
    for var, (_, typed) in NON_DEFAULT.items():
        assert _get(resolved, ENV_VARS[var]) == typed, var


def test_launcher_defaults_equal_the_presets():
    """The launcher's ${VAR:-default}s are a copy of opd.presets over the TrainConfig defaults, kept for reading;
    `opd train` relies on the two being equal to tell the launcher's defaults from the caller's variables."""
    blocks = _launcher_blocks(OPD_SH)
    assert set(blocks["opd"]) == set(ENV_VARS), "every variable is exported with a default, and only those"
    assert set(blocks) == {"opd", "grpo"}
    for name, block in blocks.items():
        if name != "opd":
            assert {ENV_VARS[var] for var in block} == set(PRESETS[name]), f"{name}: the block sets other keys"
        shown = resolve(None, {**blocks["opd"], **block}).to_dict()
        table = resolve(None, PRESETS[name]).to_dict()
        differ = {k: (shown[k], table[k]) for k in table if shown[k] != table[k]}
        assert not differ, f"{name}: launcher default != opd/presets.py (launcher, table): {differ}"
    # and the scripts with nothing set resolve to the tables
    assert _print_config(OPD_SH, _clean_env()) == TrainConfig().to_dict()
    assert _print_config(GRPO_SH, _clean_env()) == resolve(None, PRESETS["grpo"]).to_dict()


def test_header_documents_every_variable():
    header = "".join(line for line in OPD_SH.read_text().splitlines(keepends=True) if line.startswith("#"))
    for var in list(ENV_VARS) + ["ENGINE", "PRESET"]:
        assert var in header, f"{var} is not documented in the launcher header"


def test_grpo_launcher_is_the_grpo_preset_and_the_environment_still_wins():
    text = GRPO_SH.read_text()
    assert "PRESET=grpo exec bash" in text and "export " not in text, "grpo.sh only selects the preset"
    grpo = resolve(None, PRESETS["grpo"]).to_dict()
    assert _print_config(OPD_SH, _clean_env(PRESET="grpo")) == grpo
    overridden = _print_config(GRPO_SH, _clean_env(N_RESPONSES="3", VAL_TEMPERATURE="0.5"))
    assert overridden["n_responses"] == 3 and overridden["val_temperature"] == 0.5
    # the caller repeating a GRPO default: once refused (a half-merged configuration was validated)
    assert _print_config(GRPO_SH, _clean_env(LOG_PROB_TOP_K="0")) == grpo
    assert _print_config(GRPO_SH, _clean_env(ADV_ESTIMATOR="grpo", LOG_PROB_TOP_K="0")) == grpo


def test_preset_the_launcher_cannot_show_fails_clearly():
    proc = subprocess.run(["bash", str(OPD_SH)], env=_clean_env(PRESET="toy_opd"), capture_output=True, text=True)
    assert proc.returncode == 2 and "PRESET=toy_opd is not valid; expected opd or grpo" in proc.stderr


def test_extra_arguments_pass_through_and_beat_the_environment():
    resolved = _print_config(OPD_SH, _clean_env(LR="0.1"), "lr=0.5", "algo.tail_bucket=true")
    assert resolved["lr"] == 0.5 and resolved["algo"]["tail_bucket"] is True


def _verl_command(script, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), "--print-command", "trainer.total_training_steps=3"],
        env=_clean_env(ENGINE="verl", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_engine_verl_builds_main_ppo_from_the_same_variables():
    """ENGINE=verl maps the launcher's variables to verl's keys (the OPD trainer mode for OPD, verl's own trainer for
    GRPO); extra arguments are Hydra overrides, appended last; what verl cannot honour is refused in one line."""
    models = dict(ACTOR_MODEL_PATH="/m/student", REWARD_MODEL_PATH="/m/teacher", OUTPUT_DIR="/tmp/o", RUN_NAME="r")
    opd = _verl_command(OPD_SH, **models, LOG_PROB_TOP_K="8", TOP_K_STRATEGY="union", N_RESPONSES="3")
    assert opd.returncode == 0, opd.stderr
    args = opd.stdout.split()
    for expected in (
        "verl.trainer.main_ppo",
        "trainer.v1.trainer_mode=opd",
        "+opd.top_k=8",
        "+opd.top_k_strategy=union",
        "+opd.teacher.path=/m/teacher",
        "actor_rollout_ref.rollout.n=3",
        "actor_rollout_ref.model.path=/m/student",
        "data.train_batch_size=64",
        "trainer.default_local_dir=/tmp/o/r/checkpoints",
        "OPD_VERL=1",
        "VERL_FILE_LOGGER_PATH=/tmp/o/r/metrics.jsonl",
    ):
        assert expected in args, expected
    assert args.index("trainer.total_training_steps=3") > args.index("trainer.v1.trainer_mode=opd")  # last: wins
    grpo = _verl_command(GRPO_SH, **models)
    assert grpo.returncode == 0, grpo.stderr
    args = grpo.stdout.split()
    assert "trainer.v1.trainer_mode=opd" not in args and not any(a.startswith("+opd.") for a in args)
    assert "algorithm.adv_estimator=grpo" in args and "actor_rollout_ref.rollout.n=8" in args
    refused = _verl_command(OPD_SH, **models, REPETITION_PENALTY="1.2")
    assert refused.returncode == 2
    assert "REPETITION_PENALTY=1.2: verl's rollout has no repetition penalty" in refused.stderr
    unset = _verl_command(OPD_SH)
    assert unset.returncode == 2 and "ACTOR_MODEL_PATH is not set" in unset.stderr
    bad = subprocess.run(["bash", str(OPD_SH)], env=_clean_env(ENGINE="ray"), capture_output=True, text=True)
    assert bad.returncode == 2 and "expected local or verl" in bad.stderr


def test_missing_model_path_points_to_the_demo():
    proc = subprocess.run(["bash", str(OPD_SH)], env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "ACTOR_MODEL_PATH is not set" in proc.stderr and "opd demo" in proc.stderr


@pytest.mark.parametrize("script", [OPD_SH, GRPO_SH])
def test_launcher_hygiene(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert '"$@"' in text
    for debug in ("CUDA_LAUNCH_BLOCKING", "set -x", "HYDRA_FULL_ERROR", "TORCH_USE_CUDA_DSA"):
        assert debug not in text
    # no hard assignment of a documented variable (the reference launchers' bug): every assignment is ${VAR:-...}
    for line in text.splitlines():
        m = re.match(r"^\s*(?:export\s+)?(\w+)=", line)
        if m and m.group(1) in ENV_VARS:
            assert EXPORT.match(line.strip()), f"hard-assigned variable: {line!r}"


def test_yaml_beats_launcher_defaults_and_caller_variables_beat_the_yaml(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 5.0e-4\nmax_resp_length: 48\nn_responses: 6\nalgo:\n  top_k: 4\n")
    resolved = _print_config(OPD_SH, _clean_env(MINI_BATCH_SIZE="7"), "--config", str(cfg))
    assert resolved["lr"] == 5e-4 and resolved["max_resp_length"] == 48 and resolved["algo"]["top_k"] == 4
    assert resolved["mini_batch_size"] == 7  # set by the caller: beats the YAML's absence and the default
    overridden = _print_config(OPD_SH, _clean_env(LR="0.25", LOG_PROB_TOP_K="2"), "--config", str(cfg))
    assert overridden["lr"] == 0.25 and overridden["algo"]["top_k"] == 2 and overridden["max_resp_length"] == 48
    # grpo.sh's recipe is a launcher default too: the YAML beats it, the caller beats both
    cfg.write_text("lr: 5.0e-4\nn_responses: 6\n")
    grpo = _print_config(GRPO_SH, _clean_env(), "--config", str(cfg))
    assert grpo["n_responses"] == 6 and grpo["algo"]["adv_estimator"] == "grpo"
    grpo = _print_config(GRPO_SH, _clean_env(N_RESPONSES="3"), "--config", str(cfg))
    assert grpo["n_responses"] == 3
    # a YAML naming a preset: through the launcher exactly as `opd train --config`
    toy = ROOT / "configs/local/toy_opd.yaml"
    assert _print_config(OPD_SH, _clean_env(), "--config", str(toy)) == from_yaml(toy).to_dict()
    proc = subprocess.run(
        ["bash", str(GRPO_SH), "--config", str(toy), "--print-config"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "names preset 'toy_opd', but --preset grpo was given" in proc.stderr
