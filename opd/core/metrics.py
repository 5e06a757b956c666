"""OPD dynamics diagnostics (docs/algorithm.md §6) as pure functions: tensors in, a flat dict of floats out.

Why pure functions: the engine only logs the dict (metrics.jsonl) and the report plots every scalar vs step
afterwards; nothing here touches a logger, a plot or a trainer. Every statistic is a mean over valid response
positions (response mask > 0) of the batch; a key whose population is empty at this step (e.g. teacher-only
candidates under `only_stu`, a position window no response reaches) is left out rather than logged as NaN.

Keys written by `dynamics_metrics` (prefix "opd/" by default). S_t / T_t = student / teacher top-K ids.
  overlap_ratio               |S_t ∩ T_t| / K
  overlap_mass_student        sum of p over S_t ∩ T_t            overlap_mass_teacher   sum of q over S_t ∩ T_t
  top1_agreement              argmax p == argmax q (over each model's top-K)
  entropy/student, entropy/teacher, entropy/gap   full-vocabulary entropies and teacher - student
  reverse_kl                  per-token reverse KL, when the caller has it (exact full-vocab KL_t, or -reward
                              for K = 0, the k1 estimate)
  candidates/{student,teacher,overlap,valid}   valid support slots per position that are in S_t, in T_t, in both,
                              and all valid slots (a tail-bucket slot counts only in `valid`)
  advantage_mean              mean advantage over valid slots (or positions, for [N, T] advantages)
  overlap_token_advantage     mean advantage over valid slots in S_t ∩ T_t
  student_only_advantage, teacher_only_advantage   ... over valid slots in S_t \\ T_t and in T_t \\ S_t
  max_adv/{A,p,q,p_minus_q}, min_adv/{...}   at the overlap slot with the largest / smallest advantage
  response_length/{mean,min,max}, valid_tokens
  pos/{a}-{b}/<name>          every per-position mean above restricted to positions a..b (inclusive, 0-based;
                              the last window is `pos/{a}+`), window edges from `position_edges`
`per_position_profile` returns the same per-position means as arrays over position (binned), for the report's
"vs position" plots. Advantages passed here are those of the support slots: with `token_reward_direct_plus_grpo`
in the top-k path pass `adv[..., :C]` (the extra sampled-token slot is not a support candidate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opd.core.support import topk_membership
from opd.core.types import LogitStats, Support

DEFAULT_POSITION_EDGES = (0, 256, 1024, 4096)


def _position_stats(mask_NT: torch.Tensor, inputs: "DiagnosticInputs") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (sum_NT, count_NT) in float64: the statistic's mean over any set of positions P is
    sum_P sum_NT / sum_P count_NT. Position-level values have count 1; slot-level ones count their slots."""
    student, teacher, support = inputs.student, inputs.teacher, inputs.support
    advantages, reverse_kl_NT = inputs.advantages, inputs.reverse_kl_NT
    N, T = mask_NT.shape
    ones = torch.ones(N, T, dtype=torch.float64, device=mask_NT.device)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def per_pos(name: str, value_NT: torch.Tensor) -> None:
        stats[name] = (value_NT.double(), ones)

    def per_slot(name: str, value: torch.Tensor, sel: torch.Tensor) -> None:
        v = torch.where(sel, value.double(), torch.zeros((), dtype=torch.float64, device=value.device))
        stats[name] = (v.sum(-1), sel.double().sum(-1))

    have_topk = (
        student is not None
        and teacher is not None
        and student.topk_ids_NTK is not None
        and teacher.topk_ids_NTK is not None
    )
    if have_topk:
        s_ids, t_ids = student.topk_ids_NTK, teacher.topk_ids_NTK
        if s_ids.shape != t_ids.shape or s_ids.shape[:2] != (N, T):
            raise ValueError(
                f"student top-k ids {tuple(s_ids.shape)} and teacher top-k ids {tuple(t_ids.shape)} must both be "
                f"[N, T, K] with N, T = {N}, {T}"
            )
        s_in_t, t_in_s = topk_membership(s_ids, t_ids), topk_membership(t_ids, s_ids)
        K = s_ids.shape[-1]
        per_pos("overlap_ratio", s_in_t.double().sum(-1) / K)
        zero = torch.zeros((), dtype=torch.float64, device=s_ids.device)
        per_pos("overlap_mass_student", torch.where(s_in_t, student.topk_lp_NTK.double().exp(), zero).sum(-1))
        per_pos("overlap_mass_teacher", torch.where(t_in_s, teacher.topk_lp_NTK.double().exp(), zero).sum(-1))
        s_top1 = s_ids.gather(-1, student.topk_lp_NTK.argmax(-1, keepdim=True))
        t_top1 = t_ids.gather(-1, teacher.topk_lp_NTK.argmax(-1, keepdim=True))
        per_pos("top1_agreement", (s_top1 == t_top1).squeeze(-1).double())
    if student is not None:
        per_pos("entropy/student", student.entropy_NT)
    if teacher is not None:
        per_pos("entropy/teacher", teacher.entropy_NT)
    if student is not None and teacher is not None:
        per_pos("entropy/gap", teacher.entropy_NT.double() - student.entropy_NT.double())
    if reverse_kl_NT is not None:
        per_pos("reverse_kl", reverse_kl_NT)

    if support is not None:
        valid = support.valid_NTC.bool()
        in_s, in_t = support.in_student_topk_NTC.bool(), support.in_teacher_topk_NTC.bool()
        # counts per position (mean over positions), not per-slot means
        per_pos("candidates/student", (valid & in_s).sum(-1))
        per_pos("candidates/teacher", (valid & in_t).sum(-1))
        per_pos("candidates/overlap", (valid & in_s & in_t).sum(-1))
        per_pos("candidates/valid", valid.sum(-1))
    if advantages is not None:
        if advantages.dim() == 2:
            per_pos("advantage_mean", advantages)
        else:
            if support is None or advantages.shape != support.valid_NTC.shape:
                raise ValueError(
                    f"advantages {tuple(advantages.shape)} must be [N, T] or match the support slots "
                    f"{None if support is None else tuple(support.valid_NTC.shape)}"
                )
            per_slot("advantage_mean", advantages, valid)
            per_slot("overlap_token_advantage", advantages, valid & in_s & in_t)
            per_slot("student_only_advantage", advantages, valid & in_s & ~in_t)
            per_slot("teacher_only_advantage", advantages, valid & in_t & ~in_s)
    return stats


def _totals_over_rollouts(
    mask_NT: torch.Tensor, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Names and [S, T] float64 sums / counts over the valid rollouts at each position: every mean over a set of
    positions (whole batch, a window, a bin) is then a sum over a range of T, with no [N, T] work per window."""
    names = list(stats)
    if not names:
        empty = torch.zeros(0, mask_NT.shape[1], dtype=torch.float64, device=mask_NT.device)
        return names, empty, empty
    zero = torch.zeros((), dtype=torch.float64, device=mask_NT.device)
    sums = torch.stack([torch.where(mask_NT, stats[k][0], zero) for k in names]).sum(1)
    counts = torch.stack([torch.where(mask_NT, stats[k][1], zero) for k in names]).sum(1)
    return names, sums, counts


def window_name(lo: int, hi: int | None) -> str:
    return f"pos/{lo}+" if hi is None else f"pos/{lo}-{hi - 1}"


def _check_edges(edges: Sequence[int]) -> list[int]:
    edges = [int(e) for e in edges]
    if not edges or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"position_edges={tuple(edges)!r} is not valid; expected increasing ints >= 0, e.g. (0, 256)")
    return edges


@dataclass(frozen=True)
class DiagnosticInputs:
    """The tensors of one step the diagnostics read; every one but the mask is optional (what can be computed from
    what is given is reported, e.g. GRPO without a teacher: student entropy, advantages, lengths)."""

    response_mask_NT: torch.Tensor
    student: LogitStats | None = None
    teacher: LogitStats | None = None
    support: Support | None = None
    advantages: torch.Tensor | None = None  # of the support's candidates ([N, T, C]) or per position ([N, T])
    reverse_kl_NT: torch.Tensor | None = None


@torch.no_grad()
def dynamics_metrics(
    inputs: DiagnosticInputs, *, position_edges: Sequence[int] = DEFAULT_POSITION_EDGES, prefix: str = "opd/"
) -> dict[str, float]:
    """The dynamics of one training batch (see the module docstring for the keys)."""
    edges = _check_edges(position_edges)
    mask = inputs.response_mask_NT > 0
    stats = _position_stats(mask, inputs)
    names, sum_ST, count_ST = _totals_over_rollouts(mask, stats)
    windows = [("", 0, None)] + [(window_name(lo, hi) + "/", lo, hi) for lo, hi in zip(edges, [*edges[1:], None])]
    # [S, W] sums and counts for every (statistic, window) pair, moved to the host once
    sums = torch.stack([sum_ST[:, lo:hi].sum(-1) for _, lo, hi in windows], -1).tolist()
    counts = torch.stack([count_ST[:, lo:hi].sum(-1) for _, lo, hi in windows], -1).tolist()
    out: dict[str, float] = {}
    for w, (win_prefix, _, _) in enumerate(windows):
        for i, name in enumerate(names):
            if counts[i][w] > 0:
                out[f"{prefix}{win_prefix}{name}"] = sums[i][w] / counts[i][w]
    out.update(_extrema(mask, inputs.support, inputs.advantages, prefix))
    lengths_N = mask.sum(-1).double()
    out[f"{prefix}valid_tokens"] = float(lengths_N.sum())
    if lengths_N.numel():
        out[f"{prefix}response_length/mean"] = float(lengths_N.mean())
        out[f"{prefix}response_length/min"] = float(lengths_N.min())
        out[f"{prefix}response_length/max"] = float(lengths_N.max())
    return out


def _extrema(mask_NT, support, advantages, prefix) -> dict[str, float]:
    """A, p, q and p - q at the overlap slots (valid, in S_t ∩ T_t, unmasked position) of max and min advantage."""
    if support is None or advantages is None or advantages.dim() != 3:
        return {}
    sel = support.valid_NTC.bool() & support.in_student_topk_NTC.bool() & support.in_teacher_topk_NTC.bool()
    sel = sel & mask_NT.unsqueeze(-1)
    if not sel.any():
        return {}
    adv = advantages[sel].double()
    p, q = support.student_lp_NTC[sel].double().exp(), support.teacher_lp_NTC[sel].double().exp()
    out = {}
    for tag, idx in (("max_adv", int(adv.argmax())), ("min_adv", int(adv.argmin()))):
        out[f"{prefix}{tag}/A"] = float(adv[idx])
        out[f"{prefix}{tag}/p"] = float(p[idx])
        out[f"{prefix}{tag}/q"] = float(q[idx])
        out[f"{prefix}{tag}/p_minus_q"] = float(p[idx] - q[idx])
    return out


@torch.no_grad()
def per_position_profile(inputs: DiagnosticInputs, *, bin_size: int = 1) -> dict[str, list[float]]:
    """Per-position means (same names as `dynamics_metrics`, no prefix) in bins of `bin_size` positions.

    Returns "position" (first position of each bin), "tokens" (valid tokens in the bin) and one list per statistic,
    NaN where a bin has no population. Bins stop at the last position any response reaches."""
    if not (isinstance(bin_size, int) and bin_size >= 1):
        raise ValueError(f"bin_size={bin_size!r} is not valid; expected an int >= 1")
    mask = inputs.response_mask_NT > 0
    stats = _position_stats(mask, inputs)
    stats["tokens"] = (mask.double(), torch.ones_like(mask, dtype=torch.float64))  # sum = valid tokens
    names, sum_ST, count_ST = _totals_over_rollouts(mask, stats)
    tokens_T = sum_ST[names.index("tokens")]
    reached = tokens_T.nonzero()
    T_used = int(reached.max()) + 1 if reached.numel() else 0
    n_bins = math.ceil(T_used / bin_size)
    bin_of_T = torch.arange(T_used, device=mask.device) // bin_size

    def binned(x_ST: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros(x_ST.shape[0], n_bins, dtype=torch.float64, device=x_ST.device)
        return zeros.index_add(1, bin_of_T, x_ST[:, :T_used])

    s, c = binned(sum_ST), binned(count_ST)
    mean = torch.where(c > 0, s / c.clamp(min=1e-300), torch.full_like(s, float("nan"))).tolist()
    out: dict[str, list[float]] = {"position": [float(b * bin_size) for b in range(n_bins)]}
    for i, name in enumerate(names):
        out[name] = s[i].tolist() if name == "tokens" else mean[i]
    return out
