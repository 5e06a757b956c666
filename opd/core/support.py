"""Candidate sets C_t of the top-k strategies (docs/algorithm.md §2), laid out as fixed-width slots.

Why slots: rewards, advantages and the PPO surrogate are all per candidate, and a fixed [N, T, C] layout with a
validity mask keeps every later stage a plain vectorised tensor expression. Layouts (K = top-k width):
    only_stu            K slots   S_t
    only_tch            K slots   T_t
    intersection        K slots   the student's slots; valid where the id is also in T_t
    union               2K slots  S_t, then T_t; a teacher slot whose id is already in S_t is invalid
    union-intersection  2K slots  S_t, then T_t; valid only where the id is NOT in the other set (symmetric diff.)
Invalid slots keep a real token id and real log-probs (so gathers never fail, and metrics that want S_t ∩ T_t can
still read them); every reward at an invalid slot is exactly 0.

Optional tail bucket: one extra last slot, id -1, whose log-prob is log(1 - sum of the probabilities of the valid
non-tail slots), for the student and the teacher alike, so the support covers all of the mass.

Each strategy is registered with what it needs, so an engine skips forward passes it does not need:
`STRATEGIES.get(name).needs_student_lp_at_teacher` (a student pass at the teacher's ids) and
`.needs_teacher_lp_at_student`. `.normalise` says whether reward weights are renormalised over the valid slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd.core.logits import DEFAULT_CHUNK_SIZE, logprobs_at
from opd.core.registry import Registry
from opd.core.types import Support

TAIL_ID = -1
# Floor of the tail mass (1 - covered mass). The covered mass inherits the float32 rounding of the log-probs it
# sums (~1e-7 in total), so 1 - mass below ~1e-6 is noise (with K = V it can even come out negative). With the
# floor the tail log-prob is >= log(1e-6) ~ -13.8 and finite; when both models' tails hit the floor their
# log-ratio is exactly 0.
TAIL_MIN_MASS = 1e-6


def topk_membership(ids_NTK: torch.Tensor, other_ids_NTJ: torch.Tensor) -> torch.Tensor:
    """Bool [N, T, K]: is ids[n, t, k] among other_ids[n, t, :]? Sort + binary search: O(K log J) memory-light.

    (A broadcast compare would build an [N, T, K, J] tensor: 0.5 GB for 512k positions at K = J = 32.)
    """
    if ids_NTK.shape[:-1] != other_ids_NTJ.shape[:-1]:
        raise ValueError(
            f"top-k id tensors disagree on leading dims: {tuple(ids_NTK.shape)} vs {tuple(other_ids_NTJ.shape)}"
        )
    if other_ids_NTJ.shape[-1] == 0:
        return torch.zeros(ids_NTK.shape, dtype=torch.bool, device=ids_NTK.device)
    sorted_NTJ = other_ids_NTJ.sort(dim=-1).values.contiguous()
    pos_NTK = torch.searchsorted(sorted_NTJ, ids_NTK.contiguous()).clamp_(max=sorted_NTJ.shape[-1] - 1)
    return sorted_NTJ.gather(-1, pos_NTK) == ids_NTK


def tail_logprob(lp_NTC: torch.Tensor, valid_NTC: torch.Tensor) -> torch.Tensor:
    """log(1 - sum over valid slots of exp(lp)) -> [N, T], floored at log(TAIL_MIN_MASS); differentiable.

    The sum runs in float64 (cheap at [N, T, C]): 1 - covered loses float32's relative precision exactly when the
    tail is small, e.g. a tail of 1e-4 would carry a ~0.1% error. log1p keeps small covered masses exact; the clamp
    keeps a near-1 covered mass finite (see TAIL_MIN_MASS). Returns lp's dtype.
    """
    lp64_NTC = lp_NTC.double()
    covered_NT = torch.where(valid_NTC, lp64_NTC.exp(), torch.zeros_like(lp64_NTC)).sum(-1)
    return torch.log1p(-covered_NT.clamp(max=1.0 - TAIL_MIN_MASS)).to(lp_NTC.dtype)


LP_INPUTS = (
    "student_lp_at_student_NTK",
    "teacher_lp_at_student_NTK",
    "student_lp_at_teacher_NTK",
    "teacher_lp_at_teacher_NTK",
)


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: the builder, the log-prob inputs it reads, and how its weights are normalised."""

    build: Callable[..., tuple[torch.Tensor, ...]]
    inputs: frozenset[str]  # subset of LP_INPUTS
    normalise: bool
    slots_per_k: int  # 1 (K slots) or 2 (2K slots), before the optional tail

    @property
    def needs_student_lp_at_teacher(self) -> bool:
        """A student pass (no grad) scoring the teacher's top-k ids."""
        return "student_lp_at_teacher_NTK" in self.inputs

    @property
    def needs_teacher_lp_at_student(self) -> bool:
        """The teacher pass must score the student's top-k ids."""
        return "teacher_lp_at_student_NTK" in self.inputs


STRATEGIES: Registry[StrategySpec] = Registry("top-k strategy")  # type: ignore[type-var]
_ON_STUDENT_IDS = ("student_lp_at_student_NTK", "teacher_lp_at_student_NTK")
_ON_TEACHER_IDS = ("student_lp_at_teacher_NTK", "teacher_lp_at_teacher_NTK")


def _register(name: str, inputs: tuple[str, ...], *, normalise: bool = True, slots_per_k: int = 1):
    def deco(fn):
        STRATEGIES.register(name)(StrategySpec(fn, frozenset(inputs), normalise, slots_per_k))
        return fn

    return deco


# Each builder takes the raw top-k tensors (s = student ids, t = teacher ids, memberships, and the four log-prob
# tensors) and returns (ids, valid, student_lp, teacher_lp, in_student, in_teacher), all [N, T, C].


@_register("only_stu", _ON_STUDENT_IDS)
def _only_stu(s, t, s_in_t, t_in_s, slp_s, tlp_s, slp_t, tlp_t):
    return s, torch.ones_like(s_in_t), slp_s, tlp_s, torch.ones_like(s_in_t), s_in_t


@_register("only_tch", _ON_TEACHER_IDS)
def _only_tch(s, t, s_in_t, t_in_s, slp_s, tlp_s, slp_t, tlp_t):
    return t, torch.ones_like(t_in_s), slp_t, tlp_t, t_in_s, torch.ones_like(t_in_s)


@_register("intersection", _ON_STUDENT_IDS)
def _intersection(s, t, s_in_t, t_in_s, slp_s, tlp_s, slp_t, tlp_t):
    return s, s_in_t, slp_s, tlp_s, torch.ones_like(s_in_t), s_in_t


def _two_halves(s, t, s_in_t, t_in_s, slp_s, tlp_s, slp_t, tlp_t, valid_s, valid_t):
    cat = lambda a, b: torch.cat([a, b], dim=-1)  # noqa: E731
    return (
        cat(s, t),
        cat(valid_s, valid_t),
        cat(slp_s, slp_t),
        cat(tlp_s, tlp_t),
        cat(torch.ones_like(s_in_t), t_in_s),
        cat(s_in_t, torch.ones_like(t_in_s)),
    )


@_register("union", _ON_STUDENT_IDS + _ON_TEACHER_IDS, slots_per_k=2)
def _union(s, t, s_in_t, t_in_s, slp_s, tlp_s, slp_t, tlp_t):
    return _two_halves(s, t, s_in_t, t_in_s, slp_s, tlp_s, slp_t, tlp_t, torch.ones_like(s_in_t), ~t_in_s)


@_register("union-intersection", _ON_STUDENT_IDS + _ON_TEACHER_IDS, normalise=False, slots_per_k=2)
def _union_minus_intersection(s, t, s_in_t, t_in_s, slp_s, tlp_s, slp_t, tlp_t):
    return _two_halves(s, t, s_in_t, t_in_s, slp_s, tlp_s, slp_t, tlp_t, ~s_in_t, ~t_in_s)


def build_support(
    strategy: str,
    *,
    student_topk_ids_NTK: torch.Tensor,
    teacher_topk_ids_NTK: torch.Tensor,
    student_lp_at_student_NTK: torch.Tensor | None,
    teacher_lp_at_student_NTK: torch.Tensor | None,
    student_lp_at_teacher_NTK: torch.Tensor | None = None,
    teacher_lp_at_teacher_NTK: torch.Tensor | None = None,
    tail_bucket: bool = False,
) -> Support:
    """The strategy's support from both models' top-k ids and the log-probs of each model at each id set.

    Both id tensors are always needed (they define the memberships every strategy reports); the log-prob tensors a
    strategy does not read may be None (see the module docstring / STRATEGIES flags). All inputs [N, T, K],
    log-probs float32 and full-vocabulary normalised (from `logit_stats`). Returns a Support with C = K or 2K slots,
    plus one tail slot when `tail_bucket`.
    """
    spec = STRATEGIES.get(strategy)
    s, t = student_topk_ids_NTK, teacher_topk_ids_NTK
    if s.shape != t.shape:
        raise ValueError(f"student_topk_ids_NTK {tuple(s.shape)} and teacher_topk_ids_NTK {tuple(t.shape)} differ")
    given = dict(
        zip(
            LP_INPUTS,
            (
                student_lp_at_student_NTK,
                teacher_lp_at_student_NTK,
                student_lp_at_teacher_NTK,
                teacher_lp_at_teacher_NTK,
            ),
        )
    )
    for name, tensor in given.items():
        if tensor is None:
            if name in spec.inputs:
                raise ValueError(f"top-k strategy {strategy!r} needs {name}, got None")
            given[name] = torch.zeros(s.shape, dtype=torch.float32, device=s.device)  # never read by the builder
        elif tensor.shape != s.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(s.shape)} like the top-k ids")
    s_in_t = topk_membership(s, t)
    t_in_s = topk_membership(t, s)
    ids, valid, slp, tlp, in_s, in_t = spec.build(s, t, s_in_t, t_in_s, *(given[n].float() for n in LP_INPUTS))
    if tail_bucket:
        ids, valid, slp, tlp, in_s, in_t = _append_tail(ids, valid, slp, tlp, in_s, in_t)
    return Support(
        ids_NTC=ids,
        valid_NTC=valid,
        student_lp_NTC=slp,
        teacher_lp_NTC=tlp,
        in_student_topk_NTC=in_s,
        in_teacher_topk_NTC=in_t,
        has_tail=tail_bucket,
    )


def _append_tail(ids, valid, slp, tlp, in_s, in_t):
    """One more slot holding the mass outside the valid slots; always valid (its mass is 1 when C_t is empty)."""
    one = lambda x, value: torch.full((*x.shape[:-1], 1), value, dtype=x.dtype, device=x.device)  # noqa: E731
    return (
        torch.cat([ids, one(ids, TAIL_ID)], -1),
        torch.cat([valid, one(valid, True)], -1),
        torch.cat([slp, tail_logprob(slp, valid)[..., None]], -1),
        torch.cat([tlp, tail_logprob(tlp, valid)[..., None]], -1),
        torch.cat([in_s, one(in_s, False)], -1),
        torch.cat([in_t, one(in_t, False)], -1),
    )


def sampled_token_support(
    token_ids_NT: torch.Tensor, student_lp_NT: torch.Tensor, teacher_lp_NT: torch.Tensor
) -> Support:
    """The K = 0 case as a 1-slot support at the sampled token (reward weight 1, no renormalisation).

    Membership flags are True: the sampled token is the only candidate of both sides by construction.
    """
    if not token_ids_NT.shape == student_lp_NT.shape == teacher_lp_NT.shape:
        raise ValueError(
            f"sampled-token tensors disagree: ids {tuple(token_ids_NT.shape)}, student lp "
            f"{tuple(student_lp_NT.shape)}, teacher lp {tuple(teacher_lp_NT.shape)}"
        )
    ones = torch.ones((*token_ids_NT.shape, 1), dtype=torch.bool, device=token_ids_NT.device)
    return Support(
        ids_NTC=token_ids_NT[..., None].long(),
        valid_NTC=ones,
        student_lp_NTC=student_lp_NT[..., None].float(),
        teacher_lp_NTC=teacher_lp_NT[..., None].float(),
        in_student_topk_NTC=ones,
        in_teacher_topk_NTC=ones.clone(),
    )


def slot_logprobs(
    logits_NTV: torch.Tensor,
    ids_NTC: torch.Tensor,
    valid_NTC: torch.Tensor,
    *,
    has_tail: bool,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Differentiable log-probs of a model at slot ids, [N, T, C] (the update's re-run of the student).

    Gathers through the full softmax (`logprobs_at`); with `has_tail` the last slot is the tail bucket and gets
    log(1 - covered mass) computed from the same differentiable log-probs, so its gradient is exact too. Invalid
    slots get their (real) log-prob: mask with `valid_NTC` downstream.
    """
    if not has_tail:
        return logprobs_at(logits_NTV, ids_NTC, temperature=temperature, chunk_size=chunk_size)
    lp_NTK = logprobs_at(logits_NTV, ids_NTC[..., :-1], temperature=temperature, chunk_size=chunk_size)
    tail_NT = tail_logprob(lp_NTK, valid_NTC[..., :-1])
    return torch.cat([lp_NTK, tail_NT[..., None]], dim=-1)
