"""One OPD step as pure tensor functions: what every engine calls between its forward passes.

An engine only runs the models, micro-batches, calls `backward` and steps the optimiser. Everything it computes in
between is here, in this order:

  1. reads (no grad), per micro-batch, from each model's logits at the response positions:
       `read_student`              log p at the sampled token, top-k ids / log-probs, entropy
       `read_teacher`              the same for the teacher, plus log q at the student's top-k ids
       `read_student_at_teacher`   log p at the teacher's top-k ids (only strategies that read it; else None)
       `read_full_kl`              the exact per-position reverse KL (full vocabulary only; else None)
     bundled as `StepReads` over the whole batch; an engine whose teacher runs in another process reads the exact KL
     with `full_vocab_reverse_kl_at_rows` against the teacher's `OutputHead` (opd.core.full_vocab_teacher_head);
  2. `build_targets`: support -> rewards -> teachability -> advantages -> the update's `Targets` (slot ids, validity,
     old log-probs, advantages, flags). This is the only place that branches on the kind of support
     (`OPDConfig.support`: the sampled token, a top-k set, or the full vocabulary);
  3. `step_loss` per micro-batch: the student's differentiable log-probs at the targets (`target_logprobs`), the
     policy loss, the full-vocabulary term and the KL-to-reference term, one aggregation (`loss_totals` makes the
     micro-batch losses add up to the full-batch loss); `merge_loss_metrics` combines the micro-batches' metrics;
     such an engine takes the full-vocabulary term from `full_vocab_pg_loss_at_rows` + `full_vocab_term` instead;
  4. `step_diagnostics` / `step_profile`: the dynamics metrics of `opd.core.metrics` on the same tensors.

What LOG_PROB_TOP_K selects, in one place:
  top_k = 0   "sampled"  one slot, the sampled token; reward lq - lp there (k1 estimate of -KL); GRPO too
  top_k = K   "topk"     the strategy's K or 2K candidate slots (+ tail bucket), per-slot rewards, K-dim update
  top_k = -1  "full"     no slots: the full-vocabulary surrogate carries the signal; only the outcome advantage of
                         token_reward_direct_plus_grpo sits on the sampled-token slot
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from opd.core.advantages import ADV_ESTIMATORS, compute_advantages, full_vocab_outcome_advantages, with_sampled_slot
from opd.core.config import OPDConfig
from opd.core.full_vocab import (
    OutputHead,
    full_vocab_pg_loss_from_hidden,
    full_vocab_pg_loss_NT,
    full_vocab_reverse_kl,
)
from opd.core.full_vocab_teacher_head import full_vocab_pg_loss_at_rows, full_vocab_reverse_kl_at_rows, full_vocab_term
from opd.core.logits import head_logit_stats, logit_stats, logprobs_at
from opd.core.loss import BatchTotals, agg_loss, agg_weights, apply_format_mask, kl_loss, policy_loss
from opd.core.metrics import DEFAULT_POSITION_EDGES, DiagnosticInputs, dynamics_metrics, per_position_profile
from opd.core.rewards import compute_rewards, sampled_token_rewards
from opd.core.support import STRATEGIES, build_support, sampled_token_support, slot_logprobs
from opd.core.teachability import gate_rewards
from opd.core.types import LogitStats, Support

__all__ = [
    "BatchTotals",
    "DIAGNOSTIC_K",
    "ModelStats",
    "OutputHead",
    "StepReads",
    "Targets",
    "build_targets",
    "full_vocab_pg_loss_at_rows",
    "full_vocab_reverse_kl_at_rows",
    "full_vocab_term",
    "loss_totals",
    "merge_loss_metrics",
    "needs_outcome_scores",
    "needs_student_at_teacher",
    "needs_student_logits",
    "read_full_kl",
    "read_student",
    "read_student_at_teacher",
    "read_teacher",
    "reads_width",
    "step_diagnostics",
    "step_loss",
    "step_profile",
    "student_reads_suffice",
    "target_logprobs",
]

DIAGNOSTIC_K = 16  # top-k width read for the overlap diagnostics when the support is not top-k (K = 0, full vocab)


# --- 1. reads ---------------------------------------------------------------------------------------------------


@dataclass
class ModelStats:
    """One model's no-grad reads at the response positions, float32 log-probs at its temperature, [N, T, ...]."""

    lp_NT: torch.Tensor  # log-prob at the sampled token
    entropy_NT: torch.Tensor  # full-vocabulary entropy
    topk_ids_NTK: torch.Tensor  # long; the model's own top-k ids (K = `reads_width`)
    topk_lp_NTK: torch.Tensor
    lp_at_other_NTK: torch.Tensor | None = None  # log-probs at the other model's top-k ids, when read


@dataclass
class StepReads:
    """Both models' reads over the batch; `teacher` is None when the estimator needs no teacher (GRPO)."""

    student: ModelStats
    teacher: ModelStats | None = None
    full_kl_NT: torch.Tensor | None = None  # exact reverse KL per position (full vocabulary only)


def reads_width(cfg: OPDConfig, vocab_size: int) -> int:
    """The top-k width both models are read at: K for a top-k support, else DIAGNOSTIC_K (for the metrics)."""
    return min(cfg.top_k if cfg.support == "topk" else DIAGNOSTIC_K, vocab_size)


def needs_outcome_scores(cfg: OPDConfig) -> bool:
    """Whether `build_targets` reads the rollouts' rule rewards (`outcome_scores_N`): an engine that grades in the
    background waits for the grades there only then."""
    return ADV_ESTIMATORS.get(cfg.adv_estimator).needs_outcome_scores


def needs_student_at_teacher(cfg: OPDConfig) -> bool:
    """Whether the support's slots include the teacher's top-k ids, so the student must be read there too (an engine
    whose models live apart runs one more student pass exactly then)."""
    return cfg.support == "topk" and STRATEGIES.get(cfg.top_k_strategy).needs_student_lp_at_teacher


def _read(
    cfg: OPDConfig, logits_NTV: torch.Tensor | OutputHead, ids_NTJ: torch.Tensor, k: int, temperature: float
) -> ModelStats:
    """One model's reads: column 0 of `ids_NTJ` is the sampled token, the others (if any) the other model's top-k.
    From an `OutputHead` the logits are built chunk by chunk from the hidden states and never exist whole."""
    kw = dict(k=k, ids_NTJ=ids_NTJ, temperature=temperature, chunk_size=cfg.chunk_size)
    if isinstance(logits_NTV, OutputHead):
        stats = head_logit_stats(logits_NTV.hidden_NTH, logits_NTV.weight_VH, logits_NTV.bias_V, **kw)
    else:
        stats = logit_stats(logits_NTV, **kw)
    other = stats.lp_at_ids_NTJ[..., 1:] if ids_NTJ.shape[-1] > 1 else None
    return ModelStats(
        lp_NT=stats.lp_at_ids_NTJ[..., 0],
        entropy_NT=stats.entropy_NT,
        topk_ids_NTK=stats.topk_ids_NTK,
        topk_lp_NTK=stats.topk_lp_NTK,
        lp_at_other_NTK=other,
    )


def _vocab(logits_NTV: torch.Tensor | OutputHead) -> int:
    return logits_NTV.weight_VH.shape[0] if isinstance(logits_NTV, OutputHead) else logits_NTV.shape[-1]


@torch.no_grad()
def read_student(cfg: OPDConfig, logits_NTV: torch.Tensor | OutputHead, response_ids_NT: torch.Tensor) -> ModelStats:
    """The student's reads from its logits [N, T, V] or its `OutputHead` (the same values, no [N, T, V] tensor)."""
    return _read(cfg, logits_NTV, response_ids_NT[..., None], reads_width(cfg, _vocab(logits_NTV)), cfg.temperature)


@torch.no_grad()
def read_teacher(
    cfg: OPDConfig,
    logits_NTV: torch.Tensor | OutputHead,
    response_ids_NT: torch.Tensor,
    student_topk_ids_NTK: torch.Tensor,
) -> ModelStats:
    """The teacher scores the student's exact ids: the sampled token and the student's top-k. From its logits
    [N, T, V] or its `OutputHead` (the same values, and no [N, T, V] tensor is built)."""
    ids_NTJ = torch.cat([response_ids_NT[..., None], student_topk_ids_NTK], -1)
    return _read(cfg, logits_NTV, ids_NTJ, student_topk_ids_NTK.shape[-1], cfg.teacher_temperature)


@torch.no_grad()
def read_student_at_teacher(
    cfg: OPDConfig, student_logits_NTV: torch.Tensor | OutputHead, teacher_topk_ids_NTK: torch.Tensor
) -> torch.Tensor | None:
    """log p at the teacher's top-k ids, for strategies whose slots include them (only_tch, union, ...); else None."""
    if not needs_student_at_teacher(cfg):
        return None
    return logprobs_at(student_logits_NTV, teacher_topk_ids_NTK, temperature=cfg.temperature, chunk_size=cfg.chunk_size)


def student_reads_suffice(cfg: OPDConfig, kl_from_update: bool = False) -> bool:
    """True when scoring needs nothing of the student's logits beyond `read_student` (no reads at the teacher's
    ids, no exact full-vocabulary KL): its reads may then come from wherever its logits were already seen, such
    as the sampler's own next-token logits, and the student's scoring forward is skipped. `kl_from_update`: the
    engine takes the exact KL from the update's full-vocabulary loss (`step_loss(..., full_kl_out_NT=)`)."""
    return not needs_student_at_teacher(cfg) and (cfg.support != "full" or kl_from_update)


@torch.no_grad()
def read_full_kl(
    cfg: OPDConfig, student_logits_NTV: torch.Tensor, teacher_logits_NTV: torch.Tensor
) -> torch.Tensor | None:
    """The exact reverse KL per position when the support is the full vocabulary; else None (never needed)."""
    if cfg.support != "full":
        return None
    return full_vocab_reverse_kl(
        student_logits_NTV,
        teacher_logits_NTV,
        temperature=cfg.temperature,
        teacher_temperature=cfg.teacher_temperature,
        chunk_size=cfg.chunk_size,
    )


# --- 2. targets -------------------------------------------------------------------------------------------------


@dataclass
class Targets:
    """What the update reads, [N, T, C] (C = 1 for the sampled token), and what the diagnostics read."""

    ids_NTC: torch.Tensor  # token ids the student is re-scored at (-1: tail bucket)
    valid_NTC: torch.Tensor  # bool, False at masked positions too
    old_lp_NTC: torch.Tensor  # the no-grad reads at those ids (ratio = 1 on-policy)
    adv_NTC: torch.Tensor | None  # None: the full-vocabulary loss is the whole signal
    response_mask_NT: torch.Tensor  # after the optional format mask
    support: Support  # the candidate slots (for the diagnostics)
    has_tail: bool  # the last support slot (before an extra sampled slot) is the tail bucket
    extra_sampled_slot: bool  # a last slot holding the sampled token (an estimator with `sampled_slot`, top-k)
    full_vocab: bool  # add the full-vocabulary surrogate (the update needs the teacher's logits)
    teachability_NT: torch.Tensor | None = None  # the reward multiplier per position when teachability is on
    ref_lp_NTC: torch.Tensor | None = None  # USE_KL: the reference's log-probs at the slots (`target_logprobs`)

    def rows(self, start: int, stop: int, width: int) -> "Targets":
        """Rows start..stop, positions 0..width (a micro-batch); non-tensor fields are shared."""

        def cut(value):
            return value[start:stop, :width] if torch.is_tensor(value) else value

        return Targets(**{f.name: cut(getattr(self, f.name)) for f in fields(self)})

    def support_advantages(self) -> torch.Tensor | None:
        """The advantages of the support's candidates (the extra sampled slot is none), [N, T] for one slot."""
        if self.adv_NTC is None:
            return None
        n_slots = self.support.ids_NTC.shape[-1]
        adv = self.adv_NTC[..., :n_slots]
        return adv[..., 0] if n_slots == 1 else adv


@torch.no_grad()
def build_targets(
    cfg: OPDConfig,
    reads: StepReads,
    *,
    response_ids_NT: torch.Tensor,
    response_mask_NT: torch.Tensor,
    group_index_N: torch.Tensor | None = None,
    outcome_scores_N: torch.Tensor | None = None,
    has_box_N: torch.Tensor | None = None,
) -> Targets:
    """Support -> rewards -> advantages -> the update's targets, for the configured kind of support.

    `group_index_N` says which prompt each rollout answers, `outcome_scores_N` is its rule reward, `has_box_N`
    whether its text holds a \\boxed answer (read only with ENABLE_FORMAT_REWARD)."""
    mask_NT = response_mask_NT
    if cfg.enable_format_reward:
        if has_box_N is None:
            raise ValueError("OPDConfig.enable_format_reward=True needs has_box_N (which responses hold \\boxed)")
        mask_NT = apply_format_mask(mask_NT, has_box_N)
    student, teacher = reads.student, reads.teacher
    if cfg.needs_teacher and teacher is None:
        raise ValueError(f"OPDConfig.adv_estimator={cfg.adv_estimator!r} needs the teacher's reads; got none")
    advantages = dict(response_mask_NT=mask_NT, group_index_N=group_index_N, outcome_scores_N=outcome_scores_N)
    teach_NT = None
    extra = False
    match cfg.support:
        case "topk":
            support = build_support(
                cfg.top_k_strategy,
                student_topk_ids_NTK=student.topk_ids_NTK,
                teacher_topk_ids_NTK=teacher.topk_ids_NTK,
                student_lp_at_student_NTK=student.topk_lp_NTK,
                teacher_lp_at_student_NTK=teacher.lp_at_other_NTK,
                student_lp_at_teacher_NTK=student.lp_at_other_NTK,
                teacher_lp_at_teacher_NTK=teacher.topk_lp_NTK,
                tail_bucket=cfg.tail_bucket,
            )
            rewards, teach_NT = gate_rewards(
                compute_rewards(cfg, support),
                cfg,
                student_topk_ids_NTK=student.topk_ids_NTK,
                teacher_topk_ids_NTK=teacher.topk_ids_NTK,
                student_topk_lp_NTK=student.topk_lp_NTK,
                teacher_lp_at_student_NTK=teacher.lp_at_other_NTK,
            )
            adv = compute_advantages(cfg, token_rewards=rewards, **advantages)
            ids_NTC, valid_NTC, old_NTC = support.ids_NTC, support.valid_NTC, support.student_lp_NTC
            extra = ADV_ESTIMATORS.get(cfg.adv_estimator).sampled_slot
            expected = ids_NTC.shape[-1] + int(extra)
            if adv.shape != (*ids_NTC.shape[:2], expected):
                raise ValueError(
                    f"advantage estimator {cfg.adv_estimator!r} returned {tuple(adv.shape)}; expected "
                    f"{(*ids_NTC.shape[:2], expected)} on this {ids_NTC.shape[-1]}-slot support"
                )
            if extra:  # the outcome advantage acts on the sampled token, an extra last slot
                ids_NTC, valid_NTC = with_sampled_slot(ids_NTC, valid_NTC, response_ids_NT, mask_NT)
                old_NTC = torch.cat([old_NTC, student.lp_NT[..., None]], -1)
        case "sampled":
            teacher_lp_NT = teacher.lp_NT if teacher is not None else student.lp_NT
            support = sampled_token_support(response_ids_NT, student.lp_NT, teacher_lp_NT)
            rewards = compute_rewards(cfg, support)[..., 0] if cfg.needs_teacher else None
            adv = compute_advantages(cfg, token_rewards=rewards, **advantages)[..., None]
            ids_NTC, valid_NTC, old_NTC = support.ids_NTC, support.valid_NTC, support.student_lp_NTC
        case "full":
            support = sampled_token_support(response_ids_NT, student.lp_NT, teacher.lp_NT)
            adv = full_vocab_outcome_advantages(cfg, **advantages)
            adv = adv[..., None] if adv is not None else None
            ids_NTC, valid_NTC, old_NTC = support.ids_NTC, support.valid_NTC, support.student_lp_NTC
        case other:
            raise ValueError(f"unknown support kind {other!r}")
    return Targets(
        ids_NTC=ids_NTC,
        valid_NTC=valid_NTC & (mask_NT[..., None] > 0),
        old_lp_NTC=old_NTC,
        adv_NTC=adv,
        response_mask_NT=mask_NT,
        support=support,
        has_tail=support.has_tail,
        extra_sampled_slot=extra,
        full_vocab=cfg.support == "full",
        teachability_NT=teach_NT,
    )


# --- 3. loss ----------------------------------------------------------------------------------------------------


def target_logprobs(cfg: OPDConfig, logits_NTV: torch.Tensor | OutputHead, targets: Targets) -> torch.Tensor:
    """A model's log-probs at the target slots, [n, T, C], differentiable (full-vocabulary normalised), from its
    logits or its `OutputHead` (the same values; then no [n, T, V] tensor exists, gradient included)."""
    n_support = targets.ids_NTC.shape[-1] - int(targets.extra_sampled_slot)
    lp = slot_logprobs(
        logits_NTV,
        targets.ids_NTC[..., :n_support],
        targets.valid_NTC[..., :n_support],
        has_tail=targets.has_tail,
        temperature=cfg.temperature,
        chunk_size=cfg.chunk_size,
    )
    if targets.extra_sampled_slot:
        lp = torch.cat(
            [
                lp,
                logprobs_at(
                    logits_NTV, targets.ids_NTC[..., n_support:], temperature=cfg.temperature, chunk_size=cfg.chunk_size
                ),
            ],
            -1,
        )
    return lp


def loss_totals(targets: Targets, norm_length: int) -> BatchTotals:
    """The whole batch's token / sequence counts: pass them to every micro-batch's `step_loss` so that the summed
    micro-batch losses equal the full-batch loss (micro-batching never changes the gradient)."""
    mask = targets.response_mask_NT
    return BatchTotals(
        norm_length=float(norm_length), total_tokens=float(mask.sum()), total_seqs=float((mask.sum(-1) > 0).sum())
    )


def needs_student_logits(cfg: OPDConfig, targets: Targets) -> bool:
    """False when the full-vocabulary term is the whole loss (no slot advantages, no KL term): then both models'
    `OutputHead`s are all `step_loss` needs, and an engine can skip building the student's [T, V] logits."""
    return not (targets.full_vocab and targets.adv_NTC is None and not cfg.use_kl)


def step_loss(
    cfg: OPDConfig,
    targets: Targets,
    logits_NTV: torch.Tensor | OutputHead | None,
    *,
    totals: BatchTotals,
    teacher_logits_NTV: torch.Tensor | None = None,
    lp_NTC: torch.Tensor | None = None,
    student_head: OutputHead | None = None,
    teacher_head: OutputHead | None = None,
    full_kl_out_NT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The update's loss on (a micro-batch of) the targets: policy + full-vocabulary + kl_coef * KL terms.

    `logits_NTV` are the student's logits with gradient, or its `OutputHead` (then the slot log-probs never build
    [T, V] logits); `teacher_logits_NTV` (no grad) only for the full vocabulary.
    An engine whose logits live elsewhere (a logits hook) may pass `lp_NTC` = `target_logprobs(...)` with gradient
    instead, and no logits (then the full-vocabulary term is unavailable).
    With the full vocabulary, both models' `OutputHead`s (final hidden states and output embedding) may replace
    their logits for that term: no [T, V] logits are then built. When `needs_student_logits` is False, they are
    all the loss needs (`logits_NTV` = None). `full_kl_out_NT` then receives the exact reverse KL per position
    (the diagnostics' `StepReads.full_kl_NT`, so scoring need not compute it).
    Returns the scalar loss and its metrics (see `merge_loss_metrics`)."""
    from_heads = student_head is not None and teacher_head is not None
    if logits_NTV is not None and lp_NTC is not None:
        raise ValueError("step_loss needs one of logits_NTV and lp_NTC, not both")
    if logits_NTV is None and lp_NTC is None and (needs_student_logits(cfg, targets) or not from_heads):
        raise ValueError("step_loss needs the student's logits_NTV (or lp_NTC) for these targets")
    if isinstance(logits_NTV, OutputHead) and targets.full_vocab and not from_heads:
        raise ValueError("the full-vocabulary loss from the student's OutputHead needs the teacher's OutputHead too")
    own_head = logits_NTV if isinstance(logits_NTV, OutputHead) else student_head
    anchor = next(x for x in (logits_NTV, lp_NTC, own_head and own_head.hidden_NTH) if torch.is_tensor(x))
    loss = anchor.new_zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}
    lp = lp_NTC
    if lp is None and (targets.adv_NTC is not None or cfg.use_kl):
        lp = target_logprobs(cfg, logits_NTV, targets)
    mask, valid = targets.response_mask_NT, targets.valid_NTC
    if targets.adv_NTC is not None:
        pg, pg_metrics = policy_loss(lp, targets.old_lp_NTC, targets.adv_NTC, mask, valid, cfg, totals)
        loss = loss + pg
        metrics.update(pg_metrics)
    if targets.full_vocab:
        temps = {"temperature": cfg.temperature, "teacher_temperature": cfg.teacher_temperature}
        if from_heads:
            weights_NT = agg_weights(mask, cfg.loss_agg_mode, totals)
            full = full_vocab_pg_loss_from_hidden(
                student_head,
                teacher_head,
                weights_NT,
                cfg.reward_weight_mode,
                **temps,
                chunk_size=cfg.chunk_size,
                kl_out_NT=full_kl_out_NT,
            ).float()
        elif teacher_logits_NTV is None or logits_NTV is None:
            raise ValueError(
                "the full-vocabulary loss (top_k=-1) needs the student's and the teacher's logits or output heads"
            )
        else:
            per_pos = full_vocab_pg_loss_NT(
                logits_NTV, teacher_logits_NTV, cfg.reward_weight_mode, **temps, chunk_size=cfg.chunk_size
            )
            full = agg_loss(per_pos, mask, cfg.loss_agg_mode, totals)
        loss = loss + full
        metrics["actor/full_vocab_loss"] = float(full.detach())
    if cfg.use_kl:
        if targets.ref_lp_NTC is None:
            raise ValueError("OPDConfig.use_kl=True needs targets.ref_lp_NTC (the reference's target_logprobs)")
        kl, _ = kl_loss(lp, targets.ref_lp_NTC, mask, valid, cfg, totals)
        loss = loss + cfg.kl_coef * kl
        metrics["actor/kl_loss"] = float(kl.detach())
    metrics["actor/loss"] = float(loss.detach())
    return loss, metrics


# Loss terms: each micro-batch's value is its share of the full-batch loss, so they add up; the other loss metrics
# (clip fractions, ratios, ...) are per-token means and are averaged weighted by each micro-batch's valid tokens.
SUMMED_LOSS_METRICS = ("actor/loss", "actor/pg_loss", "actor/full_vocab_loss", "actor/kl_loss")


def merge_loss_metrics(parts: list[tuple[dict[str, float], float]], totals: BatchTotals) -> dict[str, float]:
    """Combine (metrics, valid tokens) of the micro-batches of one step into the step's loss metrics."""
    out: dict[str, float] = {"actor/loss": 0.0}
    weighted: dict[str, float] = {}
    for metrics, n_valid in parts:
        for key, value in metrics.items():
            if key in SUMMED_LOSS_METRICS:
                out[key] = out.get(key, 0.0) + value
            else:
                weighted[key] = weighted.get(key, 0.0) + value * n_valid
    n_total = max(1.0, totals.total_tokens or 0.0)
    out.update({key: value / n_total for key, value in weighted.items()})
    return out


# --- 4. diagnostics ---------------------------------------------------------------------------------------------


def _diagnostics_inputs(reads: StepReads, response_mask_NT: torch.Tensor, targets: Targets | None) -> DiagnosticInputs:
    """reverse_kl: exact KL_t with the full vocabulary, else the k1 estimate at the sampled token (lp - lq), an
    unbiased per-token estimate for any K."""
    s, t = reads.student, reads.teacher
    student = LogitStats(s.topk_ids_NTK, s.topk_lp_NTK, None, s.entropy_NT)
    teacher, reverse_kl = None, None
    if t is not None:
        teacher = LogitStats(t.topk_ids_NTK, t.topk_lp_NTK, None, t.entropy_NT)
        reverse_kl = reads.full_kl_NT if reads.full_kl_NT is not None else -sampled_token_rewards(s.lp_NT, t.lp_NT)
    with_targets = targets is not None
    return DiagnosticInputs(
        response_mask_NT=response_mask_NT,
        student=student,
        teacher=teacher,
        support=targets.support if with_targets and teacher is not None else None,
        advantages=targets.support_advantages() if with_targets else None,
        reverse_kl_NT=reverse_kl,
    )


@torch.no_grad()
def step_diagnostics(
    reads: StepReads,
    response_mask_NT: torch.Tensor,
    targets: Targets | None = None,
    *,
    position_edges=DEFAULT_POSITION_EDGES,
    prefix: str = "opd/",
) -> dict[str, float]:
    """The step's dynamics metrics (`opd.core.metrics.dynamics_metrics` keys) plus the mean teachability weight.

    Without `targets` (a pre-flight check that builds none) the advantage and candidate keys are left out."""
    inputs = _diagnostics_inputs(reads, response_mask_NT, targets)
    out = dynamics_metrics(inputs, position_edges=position_edges, prefix=prefix)
    if targets is not None and targets.teachability_NT is not None:
        mask = response_mask_NT
        out[f"{prefix}teachability_weight"] = float((targets.teachability_NT * mask).sum() / mask.sum().clamp(min=1))
    return out


@torch.no_grad()
def step_profile(
    reads: StepReads, response_mask_NT: torch.Tensor, targets: Targets | None = None, *, bin_size: int = 1
) -> dict[str, list[float]]:
    """The same statistics per position (binned), for the report's "vs position" plots."""
    return per_position_profile(_diagnostics_inputs(reads, response_mask_NT, targets), bin_size=bin_size)
