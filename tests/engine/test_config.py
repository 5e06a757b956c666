"""TrainConfig: typed parsing of YAML / env / key=value settings, precedence, clear errors, run names (no models)."""

from __future__ import annotations

import pytest

from opd.engines.local import cli
from opd.engines.local.config import (
    TrainConfig,
    env_overrides,
    from_env,
    from_yaml,
    load_config,
    resolve,
    run_name_from,
)


def test_yaml_then_env_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.001\nn_responses: 2\nalgo:\n  top_k: 4\n  top_k_strategy: union\n")
    cfg = from_yaml(path)
    assert (cfg.lr, cfg.n_responses, cfg.algo.top_k, cfg.algo.top_k_strategy) == (1e-3, 2, 4, "union")
    cfg = from_env(cfg, {"N_RESPONSES": "6", "LOG_PROB_TOP_K": "", "USE_KL": "1"})
    assert cfg.n_responses == 6 and cfg.algo.top_k == 4 and cfg.algo.use_kl is True  # empty = unset
    cfg = resolve(cfg, {"n_responses": "5", "algo.top_k_strategy": "only_tch"})
    assert cfg.n_responses == 5 and cfg.algo.top_k_strategy == "only_tch" and cfg.lr == 1e-3


def test_env_overrides_ignore_unset_and_unknown_variables():
    assert env_overrides({"LR": "1e-3", "TOTAL_STEPS": "", "PATH": "/bin"}) == {"LR": "1e-3"}
    # against a reference (what the launcher's defaults give), a value equal to it is the launcher's own default
    environ = {"LR": "1e-6", "N_RESPONSES": "8", "LOG_PROB_TOP_K": "abc", "SEED": "3"}
    assert env_overrides(environ, TrainConfig()) == {"N_RESPONSES": "8", "LOG_PROB_TOP_K": "abc", "SEED": "3"}


def test_layers_preset_yaml_env_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: grpo\nn_responses: 6\nlr: 0.001\n")
    cfg = load_config(config=path)
    assert (cfg.algo.adv_estimator, cfg.algo.top_k, cfg.val_temperature) == ("grpo", 0, 1.0)  # the preset
    assert (cfg.n_responses, cfg.lr) == (6, 1e-3)  # the YAML beats the preset
    cfg = load_config(config=path, environ={"N_RESPONSES": "3", "LR": "1e-6"}, settings={"SEED": "5"})
    assert (cfg.n_responses, cfg.lr, cfg.seed) == (3, 1e-3, 5)  # LR=1e-6 is the launcher's default: not an override
    assert load_config("grpo", path) == load_config(config=path)
    with pytest.raises(ValueError, match="names preset 'grpo', but --preset toy_opd"):
        load_config("toy_opd", path)
    path.write_text("preset: nope\n")
    with pytest.raises(ValueError, match=r"run\.yaml: unknown preset 'nope'; expected one of: opd, grpo, toy_opd"):
        load_config(config=path)


def test_the_merged_configuration_is_validated_once(tmp_path):
    # the YAML alone (GRPO with the default K=16) is refused; with the caller's K=0 the merged result is valid
    path = tmp_path / "run.yaml"
    path.write_text("algo:\n  adv_estimator: grpo\n")
    cfg = load_config(config=path, environ={"LOG_PROB_TOP_K": "0"})
    assert (cfg.algo.adv_estimator, cfg.algo.top_k) == ("grpo", 0)
    cfg = load_config("grpo", environ={"ADV_ESTIMATOR": "token_reward_direct", "LOG_PROB_TOP_K": "4"})
    assert (cfg.algo.adv_estimator, cfg.algo.top_k, cfg.n_responses) == ("token_reward_direct", 4, 8)
    with pytest.raises(ValueError, match="uses no teacher"):
        load_config(config=path)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"lr": "fast"}, "TrainConfig.lr='fast' is not valid; expected float"),
        ({"n_responses": "2.5"}, "TrainConfig.n_responses=2.5 is not valid; expected int"),
        ({"use_kl": "maybe"}, "OPDConfig.use_kl='maybe' is not valid; expected bool"),
        ({"TOP_K_STRATEGY": "top"}, "OPDConfig.top_k_strategy='top' is not valid; allowed: only_stu"),
        ({"model_dtype": "fp8"}, "TrainConfig.model_dtype='fp8' is not valid; expected fp32 | bf16 | fp16"),
        ({"mini_batch_size": "0"}, "TrainConfig.mini_batch_size=0 is not valid"),
        ({"bogus": "1"}, "unknown setting 'bogus'"),
        ({"algo.bogus": "1"}, "unknown setting 'algo.bogus'"),
        ({"ADV_ESTIMATOR": "grpo"}, "adv_estimator='grpo' uses no teacher"),
    ],
)
def test_bad_settings_name_the_field(overrides, fragment):
    with pytest.raises(ValueError) as err:
        resolve(None, overrides)
    assert fragment in str(err.value)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [1, 2]\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*TrainConfig\.lr"):
        from_yaml(path)
    path.write_text("- just a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        from_yaml(path)


def test_grpo_needs_no_teacher_and_sampled_token():
    cfg = resolve(None, {"ADV_ESTIMATOR": "grpo", "LOG_PROB_TOP_K": "0"})
    assert not cfg.algo.needs_teacher


def test_run_name_encodes_the_settings():
    cfg = resolve(
        None,
        {
            "actor_model_path": "/m/Qwen3-1.7B",
            "reward_model_path": "/m/Qwen3-4B/",
            "train_dataset": "/d/dapo.parquet",
            "algo.top_k": 8,
            "n_responses": 2,
            "lr": 2e-6,
        },
    )
    name = run_name_from(cfg)
    for part in (
        "token_reward_direct",
        "dapo",
        "stu-Qwen3-1.7B",
        "tch-Qwen3-4B",
        "n2-b64",
        "k8-only_stu-student_p",
        "lr2e-06",
        "p1024-r7168",
        "t1-tt1",
    ):
        assert part in name
    assert "/" not in name
    assert run_name_from(cfg.replace(**{"algo.top_k": 4})) != name


def test_cli_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    assert "LOG_PROB_TOP_K" in capsys.readouterr().out
    assert cli.main(["--print-config", "lr=0.25", "LOG_PROB_TOP_K=3"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.25" in out and "top_k: 3" in out and "# run folder: runs/" in out
    assert cli.main(["lr"]) == 2
    assert cli.main(["nonsense=1"]) == 2
    assert "unknown setting 'nonsense'" in capsys.readouterr().err


def test_defaults_follow_the_spec():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.adam_beta1, cfg.adam_beta2, cfg.grad_clip) == (1e-6, 0.01, 0.9, 0.999, 1.0)
    assert (cfg.n_responses, cfg.mini_batch_size, cfg.save_freq, cfg.test_freq, cfg.total_epochs) == (4, 64, 20, 20, 1)
    assert (cfg.val_n, cfg.val_temperature, cfg.val_top_p) == (16, 0.7, 0.95)
    assert (cfg.max_prompt_length, cfg.max_resp_length, cfg.max_val_resp_length) == (1024, 7168, 31744)


def test_printed_config_is_a_valid_config_file(tmp_path, capsys):
    assert cli.main(["--print-config", "lr=0.125", "test_files=a.parquet,b.parquet", "algo.top_k=2"]) == 0
    path = tmp_path / "resolved.yaml"
    path.write_text(capsys.readouterr().out)
    cfg = from_yaml(path)
    assert cfg == resolve(None, {"lr": 0.125, "test_files": "a.parquet,b.parquet", "algo.top_k": 2})


def test_shipped_yaml_configs_are_valid():
    from pathlib import Path

    shipped = sorted((Path(__file__).resolve().parents[2] / "configs" / "local").glob("*.yaml"))
    assert shipped
    for path in shipped:
        from_yaml(path)


@pytest.mark.parametrize(
    "environ, fragment",
    [
        ({"LOG_PROB_TOP_K": "abc"}, "launcher variable LOG_PROB_TOP_K='abc': OPDConfig.top_k='abc' is not valid"),
        ({"TOP_K_STRATEGY": "typo"}, "launcher variable TOP_K_STRATEGY='typo': OPDConfig.top_k_strategy='typo'"),
        ({"LR": "1e-3", "MINI_BATCH_SIZE": "0"}, "launcher variable MINI_BATCH_SIZE='0': TrainConfig.mini_batch_size"),
    ],
)
def test_env_errors_name_the_launcher_variable(environ, fragment, monkeypatch, capsys):
    with pytest.raises(ValueError) as err:
        from_env(None, environ)
    assert fragment in str(err.value)
    for var, value in environ.items():
        monkeypatch.setenv(var, value)
    assert cli.main(["--from-env", "--print-config"]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_accepts_the_documented_names(device):
    assert resolve(None, {"DEVICE": device}).device == device


def test_bad_device_is_a_config_error_not_a_torch_traceback():
    with pytest.raises(ValueError, match=r"TrainConfig\.device='tpu' is not valid; expected auto \| cpu \| cuda"):
        resolve(None, {"DEVICE": "tpu"})
