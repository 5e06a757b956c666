"""OPDConfig: one default per knob, validated at construction with errors naming the field and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest

from opd.core.advantages import ADV_ESTIMATORS
from opd.core.config import OPDConfig
from opd.core.loss import KL_LOSS_TYPES, LOSS_AGG_MODES, POLICY_LOSSES
from opd.core.rewards import WEIGHT_MODES
from opd.core.support import STRATEGIES
from opd.core.teachability import TEACHABILITY_MODES


def test_defaults_are_the_spec_defaults():
    cfg = OPDConfig()
    assert (cfg.top_k, cfg.top_k_strategy, cfg.reward_weight_mode) == (16, "only_stu", "student_p")
    assert (cfg.adv_estimator, cfg.loss_agg_mode, cfg.grpo_outcome_weight) == ("token_reward_direct", "token-mean", 1.0)
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c) == (0.2, 0.2, 3.0)
    assert (cfg.use_kl, cfg.kl_coef, cfg.kl_loss_type) == (False, 0.005, "low_var_kl")
    assert (cfg.temperature, cfg.teacher_temperature, cfg.enable_format_reward) == (1.0, 1.0, False)
    assert cfg.needs_teacher and not cfg.full_vocab
    assert OPDConfig(top_k=-1).full_vocab and not OPDConfig(adv_estimator="grpo", top_k=0).needs_teacher


@pytest.mark.parametrize(
    "field,allowed",
    [
        ("top_k_strategy", STRATEGIES.names()),
        ("reward_weight_mode", WEIGHT_MODES.names()),
        ("adv_estimator", ADV_ESTIMATORS.names()),
        ("policy_loss", POLICY_LOSSES.names()),
        ("loss_agg_mode", LOSS_AGG_MODES),
        ("kl_loss_type", KL_LOSS_TYPES),
        ("teachability", TEACHABILITY_MODES),
    ],
)
def test_choice_fields_name_field_and_allowed_values(field, allowed):
    with pytest.raises(ValueError) as err:
        OPDConfig(**{field: "bogus"})
    msg = str(err.value)
    assert f"OPDConfig.{field}='bogus'" in msg
    assert all(a in msg for a in allowed)
    for value in allowed:  # every listed value is accepted (with a compatible top_k)
        kwargs = {field: value}
        if (field, value) in (("adv_estimator", "token_grpo"), ("adv_estimator", "grpo")):
            kwargs["top_k"] = 0
        if field == "teachability":
            kwargs["top_k"] = 4
        assert getattr(OPDConfig(**kwargs), field) == value


@pytest.mark.parametrize(
    "kwargs,field,hint",
    [
        ({"top_k": -2}, "top_k", ">= 0, or -1"),
        ({"top_k": True}, "top_k", "int"),
        ({"top_k": 4.0}, "top_k", "int"),
        ({"temperature": 0.0}, "temperature", "> 0"),
        ({"teacher_temperature": -1.0}, "teacher_temperature", "> 0"),
        ({"temperature": "1.0"}, "temperature", "float"),
        ({"use_kl": "false"}, "use_kl", "bool"),
        ({"clip_ratio_low": 1.0}, "clip_ratio_low", "[0, 1)"),
        ({"clip_ratio_high": -0.1}, "clip_ratio_high", "[0, 1)"),
        ({"clip_ratio_c": 1.0}, "clip_ratio_c", "> 1"),
        ({"teachability_threshold": 1.5}, "teachability_threshold", "[0, 1]"),
        ({"chunk_size": 0}, "chunk_size", ">= 1"),
        ({"kl_coef": -0.1}, "kl_coef", ">= 0"),
        ({"tail_bucket": True, "top_k": 0}, "tail_bucket", "top_k > 0"),
        ({"teachability": "mask", "top_k": -1}, "teachability", "top_k > 0"),
        ({"adv_estimator": "token_grpo"}, "token_grpo", "top_k=0"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, field, hint):
    with pytest.raises(ValueError) as err:
        OPDConfig(**kwargs)
    assert field in str(err.value) and hint in str(err.value)


def test_ints_are_accepted_for_float_fields():
    assert OPDConfig(kl_coef=0, temperature=2).temperature == 2


def test_dict_round_trip_frozen_and_unknown_keys():
    cfg = OPDConfig(top_k=4, top_k_strategy="union", use_kl=True)
    assert OPDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown OPDConfig field\(s\) \['topk'\]; valid: .*top_k"):
        OPDConfig.from_dict({"topk": 4})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 8  # type: ignore[misc]
