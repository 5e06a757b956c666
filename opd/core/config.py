"""Every knob of the OPD algorithm, each with its single default, validated at construction.

Engines, launchers and YAML only pass values through to this object; no other layer holds a default for these.
Engine-level settings (paths, batch sizes, lengths, optimiser) live in the engine's own config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from opd.core.logits import DEFAULT_CHUNK_SIZE

FULL_VOCAB = -1  # LOG_PROB_TOP_K=-1: exact reverse KL over the whole vocabulary
SUPPORT_TOP_K = {
    "sampled": "top_k=0 (the sampled token)",
    "topk": "top_k > 0 (a top-k support)",
    "full": "top_k=-1 (the full vocabulary)",
}


@dataclass(frozen=True)
class OPDConfig:
    # --- supervision support (docs/algorithm.md §1-§3) ---
    top_k: int = 16  # LOG_PROB_TOP_K: 0 = sampled token, K > 0 = top-k support, -1 = full vocabulary (see `support`)
    top_k_strategy: str = "only_stu"  # TOP_K_STRATEGY
    reward_weight_mode: str = "student_p"  # REWARD_WEIGHT_MODE
    temperature: float = 1.0  # student (rollout) temperature applied to student logits
    teacher_temperature: float = 1.0  # TEACHER_TEMPERATURE
    tail_bucket: bool = False  # one extra slot holding the probability mass outside the top-k support
    teachability: str = "off"  # off | mask | weight: act on low shared top-k mass
    teachability_threshold: float = 0.5  # shared (overlap) mass below which a position is masked / down-weighted
    chunk_size: int = DEFAULT_CHUNK_SIZE  # positions per chunk in the logits kernels (bounds peak memory)
    # --- advantages (docs/algorithm.md §4) ---
    adv_estimator: str = "token_reward_direct"  # ADV_ESTIMATOR
    grpo_outcome_weight: float = 1.0  # GRPO_OUTCOME_WEIGHT
    norm_adv_by_std: bool = True  # GRPO std normalisation
    # --- update (docs/algorithm.md §5) ---
    policy_loss: str = "ppo"  # POLICY_LOSS: ppo (dual-clip surrogate) | importance_sampling | a registered name
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0  # dual clip for negative advantages
    loss_agg_mode: str = "token-mean"  # LOSS_AGG_MODE
    use_kl: bool = False  # USE_KL: KL-to-reference loss
    kl_coef: float = 0.005
    kl_loss_type: str = "low_var_kl"
    enable_format_reward: bool = False  # ENABLE_FORMAT_REWARD: responses without \boxed get no loss

    def __post_init__(self) -> None:
        # types first, so a YAML/env string ("1e-6", "false") fails here, naming the field, not in a comparison below
        accepted = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, accepted[f.type]) or (isinstance(value, bool) and f.type != "bool"):
                raise ValueError(f"OPDConfig.{f.name}={value!r} is not valid; expected a value of type {f.type}")

        # names come from the registries of the modules that implement them (plugins included), never a copy here
        from opd.core.advantages import ADV_ESTIMATORS
        from opd.core.full_vocab import FULL_VOCAB_WEIGHT_MODES
        from opd.core.loss import KL_LOSS_TYPES, LOSS_AGG_MODES, POLICY_LOSSES
        from opd.core.plugins import load_plugins
        from opd.core.rewards import WEIGHT_MODES
        from opd.core.support import STRATEGIES
        from opd.core.teachability import TEACHABILITY_MODES

        load_plugins()

        def check_choice(name: str, allowed) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"OPDConfig.{name}={value!r} is not valid; allowed: {', '.join(allowed)}")

        check_choice("top_k_strategy", STRATEGIES.names())
        check_choice("reward_weight_mode", WEIGHT_MODES.names())
        check_choice("adv_estimator", ADV_ESTIMATORS.names())
        check_choice("policy_loss", POLICY_LOSSES.names())
        check_choice("loss_agg_mode", LOSS_AGG_MODES)
        check_choice("kl_loss_type", KL_LOSS_TYPES)
        check_choice("teachability", TEACHABILITY_MODES)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < FULL_VOCAB:
            raise ValueError(
                f"OPDConfig.top_k={self.top_k!r} is not valid; expected an int >= 0, or -1 for full vocabulary"
            )
        for name in ("temperature", "teacher_temperature"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"OPDConfig.{name}={getattr(self, name)!r} is not valid; expected a finite value > 0")
        for name in ("kl_coef", "grpo_outcome_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"OPDConfig.{name}={getattr(self, name)!r} is not valid; expected a finite value")
        for name in ("clip_ratio_low", "clip_ratio_high"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"OPDConfig.{name}={getattr(self, name)!r} is not valid; expected in [0, 1)")
        if not self.clip_ratio_c > 1:
            raise ValueError(f"OPDConfig.clip_ratio_c={self.clip_ratio_c!r} is not valid; expected > 1")
        if not 0 <= self.teachability_threshold <= 1:
            raise ValueError(
                f"OPDConfig.teachability_threshold={self.teachability_threshold!r} is not valid; expected in [0, 1]"
            )
        if self.chunk_size < 1:
            raise ValueError(f"OPDConfig.chunk_size={self.chunk_size!r} is not valid; expected >= 1")
        if self.kl_coef < 0:
            raise ValueError(f"OPDConfig.kl_coef={self.kl_coef!r} is not valid; expected >= 0")
        if self.tail_bucket and self.support != "topk":
            raise ValueError("OPDConfig.tail_bucket=True needs a top-k support (top_k > 0)")
        if self.teachability != "off" and self.support != "topk":
            raise ValueError(f"OPDConfig.teachability={self.teachability!r} needs a top-k support (top_k > 0)")
        if self.support == "full" and self.reward_weight_mode not in FULL_VOCAB_WEIGHT_MODES:
            raise ValueError(
                f"OPDConfig.reward_weight_mode={self.reward_weight_mode!r} has no full-vocabulary kernel "
                f"(top_k=-1); allowed there: {', '.join(FULL_VOCAB_WEIGHT_MODES)}"
            )
        estimator = ADV_ESTIMATORS.get(self.adv_estimator)
        if not estimator.needs_token_rewards and self.top_k != 0:
            raise ValueError(
                f"OPDConfig.adv_estimator={self.adv_estimator!r} uses no teacher, but OPDConfig.top_k "
                f"(LOG_PROB_TOP_K)={self.top_k}; set it to 0"
            )
        if self.support not in estimator.supports:
            raise ValueError(
                f"OPDConfig.adv_estimator={self.adv_estimator!r} needs "
                f"{' or '.join(SUPPORT_TOP_K[kind] for kind in estimator.supports)}; got top_k={self.top_k}"
            )

    @property
    def support(self) -> str:
        """The kind of support the teacher supervises: the sampled token, a top-k set, or the full vocabulary."""
        if self.top_k == FULL_VOCAB:
            return "full"
        return "topk" if self.top_k > 0 else "sampled"

    @property
    def full_vocab(self) -> bool:
        return self.support == "full"

    @property
    def needs_teacher(self) -> bool:
        from opd.core.advantages import ADV_ESTIMATORS

        return ADV_ESTIMATORS.get(self.adv_estimator).needs_token_rewards

    @property
    def learns_only_from_groups(self) -> bool:
        """The only signal is a rollout's score against the other rollouts of its prompt (GRPO): a group of one
        response has advantage 0."""
        from opd.core.advantages import ADV_ESTIMATORS

        estimator = ADV_ESTIMATORS.get(self.adv_estimator)
        return estimator.needs_group_index and not estimator.needs_token_rewards

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "OPDConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown OPDConfig field(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**values)
