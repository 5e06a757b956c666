"""The trainer mode's settings from verl's real Hydra config (composed, no Ray): +opd.* keys become an OPDConfig,
bad values fail with the core's one-line message, and what the slice cannot run is refused by name."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("verl")

from opd.engines.verl.settings import SettingsError, read_settings  # noqa: E402

BASE = ["algorithm.adv_estimator=grpo", "trainer.v1.trainer_mode=opd", "+opd.teacher.path=/models/teacher"]


def verl_config(*overrides: str):
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=[*BASE, *overrides])


def test_opd_keys_become_the_core_config():
    cfg = verl_config(
        "+opd.top_k=8",
        "+opd.top_k_strategy=union",
        "+opd.tail_bucket=true",
        "+opd.grpo_outcome_weight=1",
        "actor_rollout_ref.rollout.temperature=0.7",
        "data.max_response_length=64",
        "+opd.teacher.param_offload=true",
    )
    s = read_settings(cfg)
    assert (s.algo.top_k, s.algo.top_k_strategy, s.algo.tail_bucket) == (8, "union", True)
    assert s.algo.grpo_outcome_weight == 1.0 and s.algo.temperature == 0.7  # the rollout's temperature
    assert s.norm_length == 64 and s.teacher.param_offload and s.teacher.path == "/models/teacher"
    assert s.hook_algo().temperature == 1.0 == s.hook_algo().teacher_temperature  # verl scales the logits
    assert s.reads_k == 8


def test_defaults_are_the_core_defaults():
    from opd.core import OPDConfig

    s = read_settings(verl_config())
    assert s.algo == OPDConfig(temperature=s.algo.temperature)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+opd.top_k_strategy=nope"], "opd.top_k_strategy='nope' is not valid; allowed:"),
        (["+opd.topk=4"], "unknown OPDConfig field(s) ['topk']"),
        (["+opd.teacher.offload=true"], "unknown opd.teacher key(s) ['offload']"),
        (
            ["~opd.teacher.path", "+opd.top_k=0", "+opd.adv_estimator=grpo", "+opd.use_kl=true"],
            "opd.use_kl=True with opd.adv_estimator='grpo': the OPD trainer mode holds the reference",
        ),
        (["+opd.temperature=0.5"], "differs from actor_rollout_ref.rollout.temperature"),
        (["algorithm.adv_estimator=gae"], "a critic (algorithm.adv_estimator=gae"),
        (["actor_rollout_ref.actor.use_kl_loss=true"], "actor_rollout_ref.actor.use_kl_loss=True is not supported"),
        (["~opd.teacher.path"], "needs a teacher: set +opd.teacher.path=DIR"),
    ],
)
def test_refusals_name_the_setting(overrides, message):
    cfg = verl_config(*overrides)
    with pytest.raises(SettingsError) as err:
        read_settings(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_full_vocabulary_and_kl_to_reference_are_accepted():
    s = read_settings(verl_config("+opd.top_k=-1", "+opd.reward_weight_mode=teacher_p", "+opd.use_kl=true"))
    assert s.algo.support == "full" and s.reads_k == 16  # the diagnostics' top-k width
    assert s.algo.use_kl and s.algo.kl_coef == 0.005


def test_grpo_needs_no_teacher():
    s = read_settings(verl_config("~opd.teacher.path", "+opd.top_k=0", "+opd.adv_estimator=grpo"))
    assert not s.algo.needs_teacher
