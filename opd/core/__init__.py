"""The OPD algorithm as pure tensor functions: every engine (local, verl plugin) calls these.

`opd.core.step` is the step an engine runs, in order: `read_student` / `read_teacher` (what each model's logits
yield, no grad) -> `build_targets` (support, rewards, advantages: the update's targets) -> `step_loss` per
micro-batch -> `step_diagnostics` / `step_profile`. Underneath, one module per concept: `logits` (chunked reads and
their exact gradients), `support` (top-k strategies), `rewards`, `teachability`, `advantages` (estimators), `loss`
(policy losses, aggregation, KL), `full_vocab`, `metrics`, and `config` (`OPDConfig`, every knob validated against
the registries, which plugins extend: `opd.core.plugins`). This package never imports verl, ray, transformers or
vllm: engines depend on the core, never the reverse.
"""

from opd.core.advantages import ADV_ESTIMATORS, compute_advantages, register_estimator, with_sampled_slot
from opd.core.config import OPDConfig
from opd.core.full_vocab import full_vocab_pg_loss_NT, full_vocab_reverse_kl
from opd.core.logits import logit_stats, logprobs_at
from opd.core.loss import POLICY_LOSSES, agg_loss, apply_format_mask, kl_loss, kl_to_reference, policy_loss
from opd.core.metrics import dynamics_metrics, per_position_profile
from opd.core.rewards import WEIGHT_MODES, candidate_rewards, compute_rewards, sampled_token_rewards
from opd.core.step import *  # noqa: F403 (the step API: its __all__)
from opd.core.step import __all__ as _STEP_API
from opd.core.support import STRATEGIES, build_support, sampled_token_support, slot_logprobs, topk_membership
from opd.core.teachability import overlap_masses_NT, shared_mass_NT, teachability_weight_NT

__all__ = [
    *_STEP_API,  # the step (what engines call)
    "OPDConfig",
    # registries (what plugins extend)
    "ADV_ESTIMATORS",
    "POLICY_LOSSES",
    "STRATEGIES",
    "WEIGHT_MODES",
    "register_estimator",
    # the building blocks
    "agg_loss",
    "apply_format_mask",
    "build_support",
    "candidate_rewards",
    "compute_advantages",
    "compute_rewards",
    "dynamics_metrics",
    "full_vocab_pg_loss_NT",
    "full_vocab_reverse_kl",
    "kl_loss",
    "kl_to_reference",
    "logit_stats",
    "logprobs_at",
    "overlap_masses_NT",
    "per_position_profile",
    "policy_loss",
    "sampled_token_rewards",
    "sampled_token_support",
    "shared_mass_NT",
    "slot_logprobs",
    "teachability_weight_NT",
    "topk_membership",
    "with_sampled_slot",
]
