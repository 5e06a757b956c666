"""Advantage estimators (docs/algorithm.md §4): turn per-token teacher rewards and/or rule rewards into the
advantages the update multiplies with log-prob gradients.

Every estimator has one signature,

    fn(*, token_rewards, response_mask_NT, group_index_N, outcome_scores_N, cfg) -> advantages

and is registered in `ADV_ESTIMATORS` together with what it needs (`needs_token_rewards`: the teacher's dense
reward; `needs_outcome_scores`: the rule reward of each rollout; `needs_group_index`: which prompt each rollout
answers, for group statistics). `compute_advantages` checks those needs and the
shapes, so a missing input fails with a message naming it instead of deep inside a tensor op.

Shapes. `token_rewards` is [N, T] (sampled-token OPD, K = 0) or [N, T, C] (top-k support; 0 at invalid slots).
The result has the rank of `token_rewards` ([N, T] for `grpo`), with one exception documented below.

How the outcome advantage enters a [N, T, C] advantage (`token_reward_direct_plus_grpo`). GRPO's gradient is
A_out * grad lp(y_t) on the *sampled* token y_t; the signal lives in the correlation between A_out and the token
that was drawn. Spreading A_out over the support slots would destroy it (with p-weights, sum_v p grad lp = 0),
and the sampled token need not be inside the support (a temperature-1 sample often falls outside the student's
top-16). So the estimator returns [N, T, C + 1]: slots 0..C-1 carry the direct OPD advantage and the extra last
slot carries GRPO_OUTCOME_WEIGHT * A_out for the sampled token. The engine gathers its log-probs at
`with_sampled_slot(...)` ids (the support ids plus y_t); the summed per-slot surrogate then has exactly the
gradient direct-OPD + w * GRPO. (If y_t is also a support slot its two terms add; each is clipped on its own.)

Full-vocabulary OPD (top_k = -1) has no per-slot advantage: its loss is a per-position surrogate
(`opd.core.full_vocab`). `full_vocab_outcome_advantages` gives the only advantage such a run has: the outcome term
of `token_reward_direct_plus_grpo` on the sampled token ([N, T]), or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from opd.core.config import OPDConfig
from opd.core.registry import Registry

GRPO_EPS = 1e-6  # added to the group std before dividing (a constant group gives 0, not inf)


SUPPORTS = frozenset({"sampled", "topk", "full"})  # OPDConfig.support kinds


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator, the inputs it cannot run without, and the supports it works on."""

    fn: Callable[..., torch.Tensor]
    needs_token_rewards: bool  # False: no teacher at all (the run is plain RL on the sampled token, top_k = 0)
    needs_outcome_scores: bool
    needs_group_index: bool
    supports: frozenset[str]  # OPDConfig.support kinds it accepts
    sampled_slot: bool  # on a top-k support it returns C + 1 slots, the last one for the sampled token

    def __call__(self, **kwargs) -> torch.Tensor:
        return self.fn(**kwargs)


ADV_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def register_estimator(
    name: str,
    *,
    needs_token_rewards: bool,
    needs_outcome_scores: bool,
    needs_group_index: bool,
    supports: tuple[str, ...] = ("sampled", "topk"),
    sampled_slot: bool = False,
):
    """Decorator: register `fn` under `name` (a duplicate name raises). The full vocabulary (top_k = -1) has no
    per-slot advantage, so only the built-ins that `full_vocab_outcome_advantages` knows list "full"."""
    unknown = set(supports) - SUPPORTS
    if unknown:
        raise ValueError(f"estimator {name!r}: unknown supports {sorted(unknown)}; valid: {sorted(SUPPORTS)}")

    def deco(fn):
        est = AdvantageEstimator(
            fn, needs_token_rewards, needs_outcome_scores, needs_group_index, frozenset(supports), sampled_slot
        )
        ADV_ESTIMATORS.register(name)(est)
        return fn

    return deco


def compute_advantages(
    cfg: OPDConfig,
    *,
    token_rewards: torch.Tensor | None,
    response_mask_NT: torch.Tensor,
    group_index_N: torch.Tensor | None = None,
    outcome_scores_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `cfg.adv_estimator` after checking it got what it needs. Runs without gradient."""
    est = ADV_ESTIMATORS.get(cfg.adv_estimator)
    if response_mask_NT.dim() != 2:
        raise ValueError(f"response_mask_NT must be [N, T]; got shape {tuple(response_mask_NT.shape)}")
    N, T = response_mask_NT.shape
    if est.needs_token_rewards:
        if token_rewards is None:
            raise ValueError(f"advantage estimator {cfg.adv_estimator!r} needs token_rewards (teacher rewards)")
        if token_rewards.dim() not in (2, 3) or tuple(token_rewards.shape[:2]) != (N, T):
            raise ValueError(
                f"token_rewards must be [N, T] or [N, T, C] with N, T = {N}, {T}; got {tuple(token_rewards.shape)}"
            )
    if est.needs_outcome_scores and outcome_scores_N is None:
        raise ValueError(f"advantage estimator {cfg.adv_estimator!r} needs outcome_scores_N (rule rewards)")
    if est.needs_group_index and group_index_N is None:
        raise ValueError(f"advantage estimator {cfg.adv_estimator!r} needs group_index_N (prompt uid per rollout)")
    if group_index_N is not None and tuple(group_index_N.shape) != (N,):
        raise ValueError(f"group_index_N must be [N] with N = {N}; got {tuple(group_index_N.shape)}")
    if outcome_scores_N is not None and tuple(outcome_scores_N.shape) != (N,):
        raise ValueError(f"outcome_scores_N must be [N] with N = {N}; got {tuple(outcome_scores_N.shape)}")
    with torch.no_grad():
        return est(
            token_rewards=token_rewards,
            response_mask_NT=response_mask_NT,
            group_index_N=group_index_N,
            outcome_scores_N=outcome_scores_N,
            cfg=cfg,
        )


def full_vocab_outcome_advantages(
    cfg: OPDConfig,
    *,
    response_mask_NT: torch.Tensor,
    group_index_N: torch.Tensor | None = None,
    outcome_scores_N: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Full-vocabulary OPD: the direct signal is the full-vocabulary loss, so only the outcome term of
    `token_reward_direct_plus_grpo` (GRPO_OUTCOME_WEIGHT * GRPO advantage on the sampled token, [N, T]) remains;
    None for `token_reward_direct`."""
    if not cfg.full_vocab:
        raise ValueError("full_vocab_outcome_advantages is for top_k = -1 (full vocabulary); use compute_advantages")
    if cfg.adv_estimator == "token_reward_direct":
        return None
    if cfg.adv_estimator != "token_reward_direct_plus_grpo":
        raise ValueError(
            f"advantage estimator {cfg.adv_estimator!r} does not combine with the full vocabulary "
            "(top_k = -1); allowed: token_reward_direct, token_reward_direct_plus_grpo"
        )
    outcome = compute_advantages(
        replace(cfg, adv_estimator="grpo", top_k=0),
        token_rewards=None,
        response_mask_NT=response_mask_NT,
        group_index_N=group_index_N,
        outcome_scores_N=outcome_scores_N,
    )
    return cfg.grpo_outcome_weight * outcome


def with_sampled_slot(
    ids_NTC: torch.Tensor, valid_NTC: torch.Tensor, response_ids_NT: torch.Tensor, response_mask_NT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Support ids/validity plus one last slot holding the sampled token (for `token_reward_direct_plus_grpo`)."""
    ids = torch.cat([ids_NTC, response_ids_NT.unsqueeze(-1).to(ids_NTC.dtype)], dim=-1)
    valid = torch.cat([valid_NTC, response_mask_NT.unsqueeze(-1).bool()], dim=-1)
    return ids, valid


def _mask_like(mask_NT: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    m = mask_NT.to(x.dtype)
    return m.unsqueeze(-1) if x.dim() == 3 else m


def _group_ids(group_index_N: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Arbitrary prompt uids -> contiguous 0..G-1 ids."""
    uniq, inverse = torch.unique(group_index_N, return_inverse=True)
    return inverse, uniq.numel()


def _group_normalise(values: torch.Tensor, weights: torch.Tensor, gid: torch.Tensor, G: int, by_std: bool):
    """(x - group mean) [/ (group std + eps)] with per-row `gid`; `weights` (0/1, same shape as values) select the
    entries that count. Std is the unbiased one (taken as 0 for a single entry, which is 0 after centring anyway)."""
    red_dims = tuple(range(1, values.dim()))
    shape = (-1,) + (1,) * len(red_dims)
    x, w = values.double(), weights.double()

    def group_sum(t: torch.Tensor) -> torch.Tensor:  # per-row sums, then per-group sums -> [G]
        per_row = t.sum(red_dims) if red_dims else t
        return torch.zeros(G, dtype=torch.float64, device=values.device).index_add(0, gid, per_row)

    n = group_sum(w)
    mean = group_sum(x * w) / n.clamp(min=1)
    out = (x - mean[gid].view(shape)) * w
    if by_std:  # two-pass variance: no cancellation for large rewards
        var = group_sum(out * out) / (n - 1).clamp(min=1)
        out = out / (var.sqrt()[gid].view(shape) + GRPO_EPS)
    return out.to(values.dtype)


def grpo_outcome_advantage_N(outcome_scores_N: torch.Tensor, group_index_N: torch.Tensor, by_std: bool) -> torch.Tensor:
    """Per-rollout GRPO advantage: score minus its prompt group's mean (optionally / (std + eps)); 0 for groups of 1."""
    gid, G = _group_ids(group_index_N)
    scores = outcome_scores_N.float()
    return _group_normalise(scores, torch.ones_like(scores), gid, G, by_std)


@register_estimator(
    "token_reward_direct",
    needs_token_rewards=True,
    needs_outcome_scores=False,
    needs_group_index=False,
    supports=("sampled", "topk", "full"),
)
def token_reward_direct(*, token_rewards, response_mask_NT, group_index_N, outcome_scores_N, cfg):
    """The teacher reward is the advantage: no baseline, no whitening, no discount."""
    return token_rewards * _mask_like(response_mask_NT, token_rewards)


@register_estimator(
    "token_reward_direct_plus_grpo",
    needs_token_rewards=True,
    needs_outcome_scores=True,
    needs_group_index=True,
    supports=("sampled", "topk", "full"),
    sampled_slot=True,
)
def token_reward_direct_plus_grpo(*, token_rewards, response_mask_NT, group_index_N, outcome_scores_N, cfg):
    """Direct OPD advantage + w * GRPO outcome advantage on the sampled token ([N,T,C] -> [N,T,C+1], see module doc)."""
    direct = token_rewards * _mask_like(response_mask_NT, token_rewards)
    outcome_NT = cfg.grpo_outcome_weight * grpo(
        token_rewards=None,
        response_mask_NT=response_mask_NT,
        group_index_N=group_index_N,
        outcome_scores_N=outcome_scores_N,
        cfg=cfg,
    ).to(direct.dtype)
    if direct.dim() == 2:
        return direct + outcome_NT
    return torch.cat([direct, outcome_NT.unsqueeze(-1)], dim=-1)


@register_estimator(
    "token_grpo", needs_token_rewards=True, needs_outcome_scores=False, needs_group_index=True, supports=("sampled",)
)
def token_grpo(*, token_rewards, response_mask_NT, group_index_N, outcome_scores_N, cfg):
    """Group-normalise every valid token reward of a prompt's rollouts, then reward-to-go (reverse cumsum over t)."""
    if token_rewards.dim() != 2:
        raise ValueError("token_grpo needs one reward per token ([N, T], top_k = 0)")
    mask = response_mask_NT.to(token_rewards.dtype)
    gid, G = _group_ids(group_index_N)
    normed = _group_normalise(token_rewards, mask, gid, G, cfg.norm_adv_by_std)
    to_go = normed.flip(-1).cumsum(-1).flip(-1)
    return to_go * mask


@register_estimator(
    "grpo", needs_token_rewards=False, needs_outcome_scores=True, needs_group_index=True, supports=("sampled",)
)
def grpo(*, token_rewards, response_mask_NT, group_index_N, outcome_scores_N, cfg):
    """Outcome GRPO: the rollout's group-relative rule reward on every valid token ([N, T])."""
    adv_N = grpo_outcome_advantage_N(outcome_scores_N, group_index_N, cfg.norm_adv_by_std)
    return adv_N.unsqueeze(-1) * response_mask_NT.to(adv_N.dtype)
