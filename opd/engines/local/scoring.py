"""The no-grad passes of a step: student and teacher (and reference) logits -> what `opd.core` needs.

The engine only moves tensors: every number below is computed by `opd.core` (logit_stats, logprobs_at,
build_support, compute_rewards, gate_rewards, full_vocab_reverse_kl, compute_advantages, slot_logprobs). Per
micro-batch (token budget) the student and the teacher each run once in eval mode; their logits live only inside
the micro-batch, and only [N, T, K]-sized results are kept. The student's log-probs at the teacher's top-k ids reuse
the student logits of the same micro-batch (no third forward), and only when the strategy needs them.

`Targets` is what the update needs: per rollout and position, the slot ids the student is re-scored at, their
validity, the old log-probs, the advantages and (with USE_KL) the reference log-probs. The sampled-token path
(K = 0, GRPO) is a 1-slot support, so the update has a single code path for all estimators.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch

from opd.core.advantages import compute_advantages, full_vocab_outcome_advantages, with_sampled_slot
from opd.core.config import OPDConfig
from opd.core.full_vocab import full_vocab_reverse_kl
from opd.core.logits import logit_stats, logprobs_at
from opd.core.loss import apply_format_mask
from opd.core.rewards import compute_rewards
from opd.core.support import STRATEGIES, build_support, sampled_token_support, slot_logprobs
from opd.core.teachability import gate_rewards
from opd.core.types import Support
from opd.engines.local.rollout import RolloutBatch, micro_batch_bounds

DIAGNOSTIC_K = 16  # top-k width read for the overlap diagnostics when the support is not top-k (K = 0, full vocab)


def response_logits(model, mb: RolloutBatch, vocab_size: int | None = None) -> torch.Tensor:
    """Logits predicting each response token, [n, T, V]: one forward, logits kept only for the response columns."""
    position_ids = (mb.attention_mask_NL.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=mb.input_ids_NL, attention_mask=mb.attention_mask_NL, position_ids=position_ids,
                use_cache=False, logits_to_keep=mb.resp_width + 1)
    logits = out.logits[:, :-1]
    return logits if vocab_size is None else logits[..., :vocab_size]


@dataclass
class Scored:
    """Per-rollout results of the no-grad passes, padded to the batch's T (0 / id 0 where the mask is 0)."""

    student_lp_NT: torch.Tensor  # log p at the sampled token
    student_entropy_NT: torch.Tensor
    student_topk_ids_NTK: torch.Tensor | None
    student_topk_lp_NTK: torch.Tensor | None
    teacher_lp_NT: torch.Tensor | None = None  # log q at the sampled token
    teacher_entropy_NT: torch.Tensor | None = None
    teacher_topk_ids_NTK: torch.Tensor | None = None
    teacher_topk_lp_NTK: torch.Tensor | None = None
    teacher_lp_at_student_NTK: torch.Tensor | None = None
    student_lp_at_teacher_NTK: torch.Tensor | None = None
    full_kl_NT: torch.Tensor | None = None  # exact per-position reverse KL (top_k = -1 only)


def _stats_k(cfg: OPDConfig) -> int:
    return cfg.top_k if cfg.top_k > 0 else DIAGNOSTIC_K


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def score(student, teacher, batch: RolloutBatch, cfg: OPDConfig, *, token_budget: int,
          vocab_size: int | None = None, timings: dict[str, float] | None = None) -> Scored:
    """Student (and teacher) no-grad passes over the batch, micro-batched by `token_budget`.

    `timings`, when given, accumulates the seconds spent in each model's pass ("student", "teacher").
    """
    clock = timings if timings is not None else {}
    clock.setdefault("student", 0.0)
    clock.setdefault("teacher", 0.0)
    N, T = batch.response_ids_NT.shape
    k = _stats_k(cfg)
    need_s_at_t = cfg.top_k > 0 and STRATEGIES.get(cfg.top_k_strategy).needs_student_lp_at_teacher
    parts: list[dict[str, torch.Tensor]] = []
    for start, stop in micro_batch_bounds(batch, token_budget):
        mb = batch.rows(start, stop)
        sampled = mb.response_ids_NT[..., None]
        t0 = time.perf_counter()
        s_logits = response_logits(student, mb, vocab_size)
        k_eff = min(k, s_logits.shape[-1])
        s = logit_stats(s_logits, k=k_eff, ids_NTJ=sampled, temperature=cfg.temperature, chunk_size=cfg.chunk_size)
        part = {"student_lp_NT": s.lp_at_ids_NTJ[..., 0], "student_entropy_NT": s.entropy_NT,
                "student_topk_ids_NTK": s.topk_ids_NTK, "student_topk_lp_NTK": s.topk_lp_NTK}
        _sync(s_logits.device)
        t1 = time.perf_counter()
        clock["student"] += t1 - t0
        if teacher is not None:
            t_logits = response_logits(teacher, mb, vocab_size)
            t = logit_stats(t_logits, k=k_eff, ids_NTJ=torch.cat([sampled, s.topk_ids_NTK], -1),
                            temperature=cfg.teacher_temperature, chunk_size=cfg.chunk_size)
            part.update(teacher_lp_NT=t.lp_at_ids_NTJ[..., 0], teacher_entropy_NT=t.entropy_NT,
                        teacher_topk_ids_NTK=t.topk_ids_NTK, teacher_topk_lp_NTK=t.topk_lp_NTK,
                        teacher_lp_at_student_NTK=t.lp_at_ids_NTJ[..., 1:])
            if need_s_at_t:
                part["student_lp_at_teacher_NTK"] = logprobs_at(
                    s_logits, t.topk_ids_NTK, temperature=cfg.temperature, chunk_size=cfg.chunk_size)
            if cfg.full_vocab:
                part["full_kl_NT"] = full_vocab_reverse_kl(
                    s_logits, t_logits, temperature=cfg.temperature, teacher_temperature=cfg.teacher_temperature,
                    chunk_size=cfg.chunk_size)
            del t_logits
            _sync(s_logits.device)
            clock["teacher"] += time.perf_counter() - t1  # the student-at-teacher-ids and full-vocab reads too
        del s_logits
        parts.append(part)
    return Scored(**{name: _pad_cat([p[name] for p in parts], N, T) for name in parts[0]})


def _pad_cat(chunks: list[torch.Tensor], N: int, T: int) -> torch.Tensor:
    """Concatenate per-micro-batch results (each trimmed to its own T') into one [N, T, ...] tensor, zero-padded."""
    first = chunks[0]
    out = torch.zeros((N, T, *first.shape[2:]), dtype=first.dtype, device=first.device)
    row = 0
    for c in chunks:
        out[row : row + c.shape[0], : c.shape[1]] = c
        row += c.shape[0]
    return out


@dataclass
class Targets:
    """What the update reads, [N, T, C] (C = 1 in the sampled-token path)."""

    ids_NTC: torch.Tensor  # token ids the student is re-scored at (-1: tail bucket)
    valid_NTC: torch.Tensor  # bool
    old_lp_NTC: torch.Tensor  # the no-grad pass's log-probs at those ids (ratio = 1 on-policy)
    adv_NTC: torch.Tensor | None  # None: full-vocabulary loss only
    response_mask_NT: torch.Tensor  # after the optional format mask
    has_tail: bool  # the last support slot (before an extra sampled slot) is the tail bucket
    extra_sampled_slot: bool  # a last slot holding the sampled token (token_reward_direct_plus_grpo, top-k)
    full_vocab: bool  # add the full-vocabulary PG loss (needs the teacher in the update)
    ref_lp_NTC: torch.Tensor | None = None

    def rows(self, start: int, stop: int, width: int) -> "Targets":
        def cut(v):
            return v[start:stop, :width] if torch.is_tensor(v) else v
        return Targets(**{f.name: cut(getattr(self, f.name)) for f in fields(self)})


@dataclass
class Signals:
    """Everything the step computed before the update: for the loss (targets) and for the metrics."""

    targets: Targets
    support: Support
    advantages: torch.Tensor | None
    teachability_NT: torch.Tensor | None  # the per-position reward multiplier when teachability is on


@torch.no_grad()
def build_signals(scored: Scored, batch: RolloutBatch, cfg: OPDConfig, *, outcome_scores_N: torch.Tensor,
                  has_box_N: torch.Tensor) -> Signals:
    """Support -> rewards -> advantages, all through opd.core; then the update's targets."""
    mask_NT = batch.response_mask_NT
    if cfg.enable_format_reward:
        mask_NT = apply_format_mask(mask_NT, has_box_N)
    ids_NT = batch.response_ids_NT
    teach_NT = None
    if cfg.top_k > 0:
        support = build_support(
            cfg.top_k_strategy,
            student_topk_ids_NTK=scored.student_topk_ids_NTK, teacher_topk_ids_NTK=scored.teacher_topk_ids_NTK,
            student_lp_at_student_NTK=scored.student_topk_lp_NTK,
            teacher_lp_at_student_NTK=scored.teacher_lp_at_student_NTK,
            student_lp_at_teacher_NTK=scored.student_lp_at_teacher_NTK,
            teacher_lp_at_teacher_NTK=scored.teacher_topk_lp_NTK, tail_bucket=cfg.tail_bucket)
        token_rewards, teach_NT = gate_rewards(
            compute_rewards(cfg, support), cfg, student_topk_ids_NTK=scored.student_topk_ids_NTK,
            teacher_topk_ids_NTK=scored.teacher_topk_ids_NTK, student_topk_lp_NTK=scored.student_topk_lp_NTK,
            teacher_lp_at_student_NTK=scored.teacher_lp_at_student_NTK)
    else:
        teacher_lp = scored.teacher_lp_NT if scored.teacher_lp_NT is not None else scored.student_lp_NT
        support = sampled_token_support(ids_NT, scored.student_lp_NT, teacher_lp)
        token_rewards = None  # full vocabulary: the loss reads the logits directly; GRPO: no teacher reward
        if cfg.needs_teacher and not cfg.full_vocab:
            token_rewards = compute_rewards(cfg, support)[..., 0]

    if cfg.full_vocab:  # the full-vocabulary loss carries the direct OPD signal
        adv = full_vocab_outcome_advantages(cfg, response_mask_NT=mask_NT, group_index_N=batch.group_index_N,
                                            outcome_scores_N=outcome_scores_N)
    else:
        adv = compute_advantages(cfg, token_rewards=token_rewards, response_mask_NT=mask_NT,
                                 group_index_N=batch.group_index_N, outcome_scores_N=outcome_scores_N)

    extra = False
    if cfg.top_k > 0:
        ids_NTC, valid_NTC, old_NTC = support.ids_NTC, support.valid_NTC, support.student_lp_NTC
        if adv.shape[-1] == ids_NTC.shape[-1] + 1:  # direct + GRPO: outcome advantage on an extra sampled slot
            ids_NTC, valid_NTC = with_sampled_slot(ids_NTC, valid_NTC, ids_NT, mask_NT)
            old_NTC = torch.cat([old_NTC, scored.student_lp_NT[..., None]], -1)
            extra = True
    else:
        ids_NTC, valid_NTC, old_NTC = support.ids_NTC, support.valid_NTC, support.student_lp_NTC
        if adv is not None:
            adv = adv[..., None]
    targets = Targets(ids_NTC=ids_NTC, valid_NTC=valid_NTC & (mask_NT[..., None] > 0), old_lp_NTC=old_NTC,
                      adv_NTC=adv, response_mask_NT=mask_NT, has_tail=support.has_tail and cfg.top_k > 0,
                      extra_sampled_slot=extra, full_vocab=cfg.full_vocab)
    return Signals(targets=targets, support=support, advantages=adv, teachability_NT=teach_NT)


def target_logprobs(logits_NTV: torch.Tensor, targets: Targets, temperature: float, chunk_size: int) -> torch.Tensor:
    """The student's log-probs at the target slots, [n, T, C], differentiable (full-vocabulary normalised)."""
    ids = targets.ids_NTC[..., :-1] if targets.extra_sampled_slot else targets.ids_NTC
    valid = targets.valid_NTC[..., :-1] if targets.extra_sampled_slot else targets.valid_NTC
    lp = slot_logprobs(logits_NTV, ids, valid, has_tail=targets.has_tail, temperature=temperature,
                       chunk_size=chunk_size)
    if targets.extra_sampled_slot:
        lp = torch.cat([lp, logprobs_at(logits_NTV, targets.ids_NTC[..., -1:], temperature=temperature,
                                        chunk_size=chunk_size)], -1)
    return lp


@torch.no_grad()
def reference_logprobs(reference, batch: RolloutBatch, targets: Targets, cfg: OPDConfig, *, token_budget: int,
                       vocab_size: int | None = None) -> torch.Tensor:
    """USE_KL: the frozen reference policy's log-probs at the target slots, [N, T, C]."""
    N, T = batch.response_ids_NT.shape
    chunks = []
    for start, stop in micro_batch_bounds(batch, token_budget):
        mb = batch.rows(start, stop)
        logits = response_logits(reference, mb, vocab_size)
        chunks.append(target_logprobs(logits, targets.rows(start, stop, mb.resp_width), cfg.temperature,
                                      cfg.chunk_size))
    return _pad_cat(chunks, N, T)
