"""Per-position teachability: reduce the OPD signal where student and teacher barely share their top-k.

Why: successful OPD aligns the two models on their shared high-probability tokens (docs/algorithm.md §7; the shared
top-k set usually holds 97-99% of both models' mass). Where the overlap S_t ∩ T_t holds little mass, the teacher's
log-ratio on the student's candidates says little about what the teacher would do, so its reward is mostly noise.
Optional (OPDConfig.teachability, default "off"); `gate_rewards` multiplies the rewards [N, T, C] by the weight [N, T,
1].

Shared mass (our choice, documented): min(P, Q) with P = sum of p over S_t ∩ T_t and Q = sum of q over the same
set. A position is teachable only when BOTH models put enough mass on the shared tokens: a low Q means the teacher
wants tokens the student does not consider, a low P means the student is confident in tokens the teacher does not
rank; either way the overlap is a poor basis for the reward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from opd.core.support import topk_membership

if TYPE_CHECKING:
    from opd.core.config import OPDConfig

TEACHABILITY_MODES = ("off", "mask", "weight")


@torch.no_grad()
def overlap_masses_NT(
    ids_NTK: torch.Tensor, other_ids_NTK: torch.Tensor, student_lp_NTK: torch.Tensor, teacher_lp_NTK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q), float32 [N, T]: student and teacher mass on ids ∩ other_ids.

    `student_lp_NTK` / `teacher_lp_NTK` are both models' log-probs at `ids_NTK`. Pass the student's top-k as `ids`
    (with student_lp_at_student, teacher_lp_at_student) or the teacher's (with student_lp_at_teacher,
    teacher_lp_at_teacher): the overlap, hence the result, is the same.
    """
    shared_NTK = topk_membership(ids_NTK, other_ids_NTK)
    zero = torch.zeros((), dtype=torch.float32, device=ids_NTK.device)
    p_NT = torch.where(shared_NTK, student_lp_NTK.float().exp(), zero).sum(-1)
    q_NT = torch.where(shared_NTK, teacher_lp_NTK.float().exp(), zero).sum(-1)
    return p_NT, q_NT


@torch.no_grad()
def shared_mass_NT(
    ids_NTK: torch.Tensor, other_ids_NTK: torch.Tensor, student_lp_NTK: torch.Tensor, teacher_lp_NTK: torch.Tensor
) -> torch.Tensor:
    """min(P, Q) of `overlap_masses_NT`, float32 [N, T]: the mass teachability thresholds."""
    p_NT, q_NT = overlap_masses_NT(ids_NTK, other_ids_NTK, student_lp_NTK, teacher_lp_NTK)
    return torch.minimum(p_NT, q_NT)


@torch.no_grad()
def teachability_weight_NT(shared_mass_NT: torch.Tensor, mode: str, threshold: float) -> torch.Tensor:
    """Float32 [N, T] multiplier for the rewards at each position.

    off -> 1; mask -> 1 where shared mass >= threshold else 0; weight -> min(1, mass / threshold) (linear ramp to
    full signal at the threshold; threshold 0 gives 1 everywhere).
    """
    if mode not in TEACHABILITY_MODES:
        raise ValueError(f"teachability mode {mode!r} is not valid; allowed: {', '.join(TEACHABILITY_MODES)}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"teachability threshold={threshold!r} is not valid; expected in [0, 1]")
    mass_NT = shared_mass_NT.float()
    if mode == "off" or threshold == 0:
        return torch.ones_like(mass_NT)
    if mode == "mask":
        return (mass_NT >= threshold).float()
    return (mass_NT / threshold).clamp(min=0.0, max=1.0)


@torch.no_grad()
def gate_rewards(
    rewards_NTC: torch.Tensor,
    cfg: OPDConfig,
    *,
    student_topk_ids_NTK: torch.Tensor,
    teacher_topk_ids_NTK: torch.Tensor,
    student_topk_lp_NTK: torch.Tensor,
    teacher_lp_at_student_NTK: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rewards scaled by the teachability weight of their position, the weight [N, T]); with teachability off the
    rewards come back unchanged and the weight is None."""
    if cfg.teachability == "off":
        return rewards_NTC, None
    mass_NT = shared_mass_NT(student_topk_ids_NTK, teacher_topk_ids_NTK, student_topk_lp_NTK, teacher_lp_at_student_NTK)
    weight_NT = teachability_weight_NT(mass_NT, cfg.teachability, cfg.teachability_threshold)
    return rewards_NTC * weight_NT.to(rewards_NTC.dtype)[..., None], weight_NT
