"""The OPD algorithm as pure tensor functions: every engine (local, verl plugin) calls these.

Pipeline per step: `logit_stats` reads each model's top-k / log-probs / entropy from its logits (chunked, no grad);
`build_support` lays out a top-k strategy's candidate slots; `compute_rewards` turns them into per-candidate
rewards (or `sampled_token_rewards` for K = 0, `full_vocab_*` for the whole vocabulary); `compute_advantages`
runs the configured estimator; `policy_loss` (+ `kl_loss`) is the update's loss; `dynamics_metrics` and
`per_position_profile` are the step's diagnostics. This package never imports verl, ray, transformers or vllm:
engines depend on the core, never the reverse.
"""

from opd.core.advantages import ADV_ESTIMATORS, compute_advantages, with_sampled_slot
from opd.core.config import OPDConfig
from opd.core.full_vocab import full_vocab_pg_loss_NT, full_vocab_reverse_kl
from opd.core.logits import logit_stats, logprobs_at
from opd.core.loss import agg_loss, apply_format_mask, kl_loss, kl_to_reference, policy_loss
from opd.core.metrics import dynamics_metrics, per_position_profile
from opd.core.rewards import WEIGHT_MODES, candidate_rewards, compute_rewards, sampled_token_rewards
from opd.core.support import STRATEGIES, build_support, sampled_token_support, support_logprobs, topk_membership
from opd.core.teachability import overlap_masses_NT, shared_mass_NT, teachability_weight_NT

__all__ = [
    "STRATEGIES",
    "WEIGHT_MODES",
    "build_support",
    "candidate_rewards",
    "compute_rewards",
    "full_vocab_pg_loss_NT",
    "full_vocab_reverse_kl",
    "logit_stats",
    "logprobs_at",
    "overlap_masses_NT",
    "sampled_token_rewards",
    "sampled_token_support",
    "shared_mass_NT",
    "support_logprobs",
    "teachability_weight_NT",
    "topk_membership",
    # advantages, loss, metrics, config
    "ADV_ESTIMATORS",
    "OPDConfig",
    "agg_loss",
    "apply_format_mask",
    "compute_advantages",
    "dynamics_metrics",
    "kl_loss",
    "kl_to_reference",
    "per_position_profile",
    "policy_loss",
    "with_sampled_slot",
]
