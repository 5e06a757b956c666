"""The driver's part of a step: the read passes' fields -> the core's StepReads -> `build_targets` -> the fields the
update hook reads. Pure tensors in and out (no Ray, no TransferQueue), so a test runs it on the local engine's
rollouts and compares.

Conventions mapped to the core's arguments: the group index is verl's ``uid`` (one per prompt, shared by its n
rollouts; verl's synthetic padding rows each get a group of their own), the outcome score is the rule reward
``rm_scores`` summed over the response (verl's token-level reward holds it at the last token), and ``has_box``
comes from the decoded response, as in the local engine.
"""

from __future__ import annotations

import numpy as np
import torch

from opd.core.step import ModelStats, StepReads, Targets, build_targets
from opd.engines.verl import fields as F
from opd.engines.verl.settings import OPDSettings
from opd.engines.verl.tensors import PackedLayout, from_nested, full_sequence_to_response, slot_names, to_nested


def read_field_names(settings: OPDSettings) -> list[str]:
    """The TransferQueue fields the read passes wrote, which the driver needs."""
    k, algo = settings.reads_k, settings.algo
    names = [F.STUDENT_LP, F.STUDENT_ENTROPY, *slot_names(F.STUDENT_TOPK_IDS, k), *slot_names(F.STUDENT_TOPK_LP, k)]
    if algo.needs_teacher:
        names += [
            F.TEACHER_LP,
            F.TEACHER_ENTROPY,
            *slot_names(F.TEACHER_TOPK_IDS, k),
            *slot_names(F.TEACHER_TOPK_LP, k),
            *slot_names(F.TEACHER_AT_STUDENT, k),
        ]
    if needs_student_at_teacher(settings):
        names += slot_names(F.STUDENT_AT_TEACHER, k)
    if algo.support == "full":
        names.append(F.FULL_KL)
    return names


def needs_student_at_teacher(settings: OPDSettings) -> bool:
    """Whether the strategy's slots include the teacher's top-k (then the actor reads log p there: one more pass)."""
    from opd.core.step import needs_student_at_teacher as core_needs

    return core_needs(settings.hook_algo())


def _stats(
    data, layout: PackedLayout, k: int, lp: str, entropy: str, ids: str, top_lp: str, other: str | None
) -> ModelStats:
    def resp(name):
        return full_sequence_to_response(data[name], layout)

    def slots(name, dtype):
        return torch.stack([resp(n) for n in slot_names(name, k)], -1).to(dtype)

    return ModelStats(
        lp_NT=resp(lp).float(),
        entropy_NT=resp(entropy).float(),
        topk_ids_NTK=slots(ids, torch.long),
        topk_lp_NTK=slots(top_lp, torch.float32),
        lp_at_other_NTK=slots(other, torch.float32) if other is not None else None,
    )


def reads_from_fields(settings: OPDSettings, data, layout: PackedLayout) -> StepReads:
    """The read passes' per-row fields (nested over prompt + response) as the core's [N, T, K] StepReads."""
    k = settings.reads_k
    other = F.STUDENT_AT_TEACHER if needs_student_at_teacher(settings) else None
    student = _stats(data, layout, k, F.STUDENT_LP, F.STUDENT_ENTROPY, F.STUDENT_TOPK_IDS, F.STUDENT_TOPK_LP, other)
    teacher = None
    if settings.algo.needs_teacher:
        teacher = _stats(
            data,
            layout,
            k,
            F.TEACHER_LP,
            F.TEACHER_ENTROPY,
            F.TEACHER_TOPK_IDS,
            F.TEACHER_TOPK_LP,
            F.TEACHER_AT_STUDENT,
        )
    full_kl = full_sequence_to_response(data[F.FULL_KL], layout).float() if settings.algo.support == "full" else None
    return StepReads(student=student, teacher=teacher, full_kl_NT=full_kl)


def group_index(uids, padding: np.ndarray | None = None) -> torch.Tensor:
    """verl's per-rollout prompt uids -> [N] long group ids; padding rows (if flagged) get singleton groups."""
    _, index = np.unique(np.asarray([str(u) for u in uids], dtype=object).astype(str), return_inverse=True)
    index = index.astype(np.int64)
    if padding is not None and padding.any():
        index[padding] = index.max() + 1 + np.arange(int(padding.sum()))
    return torch.from_numpy(index)


def opd_targets(
    settings: OPDSettings, data, *, uids, has_box_N: torch.Tensor | None = None, padding: np.ndarray | None = None
) -> tuple[StepReads, Targets, torch.Tensor]:
    """(reads, targets, response mask) of the batch in `data` (TensorDict-like: the read fields, ``input_ids``,
    ``responses``, ``response_mask`` and ``rm_scores`` as verl stores them)."""
    layout = PackedLayout.from_nested(data["input_ids"], data["responses"])
    T = layout.width
    reads = reads_from_fields(settings, data, layout)
    response_mask = from_nested(data["response_mask"], T).float()
    targets = build_targets(
        settings.algo,
        reads,
        response_ids_NT=from_nested(data["responses"], T).long(),
        response_mask_NT=response_mask,
        group_index_N=group_index(uids, padding),
        outcome_scores_N=from_nested(data["rm_scores"], T).float().sum(-1),
        has_box_N=has_box_N,
    )
    return reads, targets, response_mask


def target_fields(targets: Targets, reads: StepReads, lengths: torch.Tensor, loss_mask_dtype=torch.int64) -> dict:
    """The nested, response-long fields the update hook reads (slot dimension kept), plus verl's own
    ``advantages`` / ``returns`` ([N, T]: the advantage summed over valid slots; with the full vocabulary and no
    outcome advantage, the exact -KL_t that the surrogate's value is for student_p) so verl's data metrics describe
    the OPD signal."""
    adv = targets.adv_NTC
    if adv is not None:
        adv_NT = torch.where(targets.valid_NTC, adv, torch.zeros_like(adv)).sum(-1)
    elif reads.full_kl_NT is not None:
        adv_NT = -reads.full_kl_NT * targets.response_mask_NT
    else:
        adv_NT = torch.zeros_like(targets.response_mask_NT)
    out = {
        F.TARGET_IDS: to_nested(targets.ids_NTC.long(), lengths),
        F.TARGET_VALID: to_nested(targets.valid_NTC.bool(), lengths),
        F.TARGET_OLD_LP: to_nested(targets.old_lp_NTC.float(), lengths),
        F.LOSS_MASK: to_nested(targets.response_mask_NT.to(loss_mask_dtype), lengths),
        "advantages": to_nested(adv_NT.float(), lengths),
        "returns": to_nested(adv_NT.float(), lengths),
    }
    if adv is not None:
        out[F.TARGET_ADV] = to_nested(adv.float(), lengths)
    if reads.teacher is not None:
        top = reads.teacher.topk_lp_NTK.argmax(-1, keepdim=True)
        out[F.TEACHER_TOP1] = to_nested(reads.teacher.topk_ids_NTK.gather(-1, top)[..., 0].long(), lengths)
    return out


def slot_info(targets: Targets) -> dict:
    """The extra_info keys that tell the update hook how the target slots are laid out."""
    return {
        F.N_SLOTS: int(targets.ids_NTC.shape[-1]),
        F.HAS_TAIL: bool(targets.has_tail),
        F.EXTRA_SLOT: bool(targets.extra_sampled_slot),
        F.FULL_VOCAB: bool(targets.full_vocab),
        F.HAS_ADV: targets.adv_NTC is not None,
    }
