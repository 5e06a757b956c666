"""Per-candidate OPD rewards A_t(c) = w_t(c) * (lq_t(v_c) - lp_t(v_c)) on a support (docs/algorithm.md §3).

Why the weights and not the log-ratio are renormalised: lq and lp are full-vocabulary log-probs; renormalising them
over the candidates would make K = 1 give exactly zero signal. Renormalised weights are computed as a masked
softmax of the log base weights, so tiny probabilities (p ~ 1e-40, below float32's normal range) still normalise
correctly instead of underflowing to 0/0. Empty candidate sets and invalid slots get exactly 0, never NaN.
Rewards carry no gradient and are not whitened, baselined or discounted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from opd.core.config import OPDConfig
from opd.core.registry import Registry
from opd.core.support import STRATEGIES
from opd.core.types import Support

# name -> log base weight [N, T, C] of each slot (only read at valid slots)
WEIGHT_MODES: Registry[Callable[[Support], torch.Tensor]] = Registry("reward weight mode")


@WEIGHT_MODES.register("student_p")
def _student_p(support: Support) -> torch.Tensor:
    return support.student_lp_NTC


@WEIGHT_MODES.register("teacher_p")
def _teacher_p(support: Support) -> torch.Tensor:
    return support.teacher_lp_NTC


@WEIGHT_MODES.register("none")
def _uniform(support: Support) -> torch.Tensor:
    return torch.zeros_like(support.student_lp_NTC)


@torch.no_grad()
def candidate_weights(support: Support, weight_mode: str, *, normalise: bool) -> torch.Tensor:
    """w_t(c), float32 [N, T, C]: the base weight, divided by its sum over the valid slots when `normalise`.

    0 at invalid slots; a position with no valid slot gets all zeros.
    """
    log_w_NTC = WEIGHT_MODES.get(weight_mode)(support).float()
    valid_NTC = support.valid_NTC
    masked_NTC = log_w_NTC.masked_fill(~valid_NTC, float("-inf"))
    if normalise:
        # softmax over a row of all -inf is NaN: such rows (empty candidate set) are zeroed below.
        w_NTC = torch.softmax(masked_NTC, dim=-1)
    else:
        w_NTC = masked_NTC.exp()
    return torch.where(valid_NTC, w_NTC, torch.zeros_like(w_NTC))


@torch.no_grad()
def candidate_rewards(support: Support, weight_mode: str, *, normalise: bool) -> torch.Tensor:
    """A_t(c) = w_t(c) * (lq - lp) at valid slots, 0 elsewhere: float32 [N, T, C]."""
    w_NTC = candidate_weights(support, weight_mode, normalise=normalise)
    log_ratio_NTC = support.teacher_lp_NTC.float() - support.student_lp_NTC.float()
    return torch.where(support.valid_NTC, w_NTC * log_ratio_NTC, torch.zeros_like(w_NTC))


@torch.no_grad()
def sampled_token_rewards(student_lp_NT: torch.Tensor, teacher_lp_NT: torch.Tensor) -> torch.Tensor:
    """K = 0: r_t = lq_t(y_t) - lp_t(y_t), float32 [N, T] (the k1 estimate of -KL_t)."""
    if student_lp_NT.shape != teacher_lp_NT.shape:
        raise ValueError(f"student lp {tuple(student_lp_NT.shape)} and teacher lp {tuple(teacher_lp_NT.shape)} differ")
    return teacher_lp_NT.float() - student_lp_NT.float()


def compute_rewards(cfg: OPDConfig, support: Support) -> torch.Tensor:
    """Rewards [N, T, C] for the configured support type.

    top_k > 0: the strategy's normalisation (raw weights for union-intersection) with cfg.reward_weight_mode.
    top_k == 0: `support` is the 1-slot sampled-token support (`sampled_token_support`); weight 1, so the result is
    lq - lp. Teachability is not applied here (see opd.core.teachability); full vocabulary (top_k == -1) has its
    own path in opd.core.full_vocab.
    """
    if cfg.full_vocab:
        raise ValueError("OPDConfig.top_k=-1 (full vocabulary) has no slot support; use opd.core.full_vocab")
    if cfg.top_k == 0:
        if support.ids_NTC.shape[-1] != 1 or support.has_tail:
            raise ValueError(
                f"OPDConfig.top_k=0 expects the 1-slot sampled-token support, got {support.ids_NTC.shape[-1]} slots"
            )
        return candidate_rewards(support, "none", normalise=False)
    spec = STRATEGIES.get(cfg.top_k_strategy)
    expected = spec.slots_per_k * cfg.top_k + int(cfg.tail_bucket)
    if support.ids_NTC.shape[-1] != expected or support.has_tail != cfg.tail_bucket:
        raise ValueError(
            f"support has {support.ids_NTC.shape[-1]} slots (tail={support.has_tail}); OPDConfig(top_k={cfg.top_k}, "
            f"top_k_strategy={cfg.top_k_strategy!r}, tail_bucket={cfg.tail_bucket}) expects {expected}"
        )
    return candidate_rewards(support, cfg.reward_weight_mode, normalise=spec.normalise)
