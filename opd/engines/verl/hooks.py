"""The loss functions the OPD trainer mode installs in verl's FSDP workers: the only place the models' logits are read.

verl's FSDP engine calls a worker's loss function twice per micro-batch when the micro-batch carries
``distillation_use_topk=True``: first as a logits hook, ``fn(student_logits=[1, L, V], data=micro_batch)`` (packed
rows, already divided by the pass's temperature, with gradient in training), whose (L,)-shaped outputs it stores in
``model_output``; then as the loss, ``fn(model_output=..., data=micro_batch, dp_group=...)``. The pass is named by
``opd_phase`` (`opd.engines.verl.fields`). The reads and the loss are the core's step API on the packed rows viewed
as one sequence [1, L, ...]; prompt rows are read too and never used (the reads are per row, so they cannot leak
into the response rows).

Loss normalisation. verl runs a mini-batch as micro-batches on each data-parallel rank, backpropagates every
micro-batch loss as it comes, and FSDP averages the gradients over the dp ranks. Each micro-batch's `step_loss`
therefore gets the mini-batch's global counts divided by the dp size: ``total_tokens = batch_num_tokens / dp`` (verl
sums the ``loss_mask`` field over the whole mini-batch on all ranks; the driver writes the core's response mask
there, format mask included) and ``total_seqs = global_batch_size / dp`` (the mini-batch's sequence count), so the
summed, dp-averaged gradient is the full mini-batch loss's, as the local engine's. The seq-mean modes divide by
every sequence of the mini-batch, whereas the local engine divides by sequences with at least one counted token: the
two differ only when a whole response is masked (empty, or no \\boxed with the format reward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.core import OPDConfig
from opd.core.step import (
    BatchTotals,
    OutputHead,
    Targets,
    full_vocab_pg_loss_at_rows,
    full_vocab_reverse_kl_at_rows,
    full_vocab_term,
    read_student,
    read_student_at_teacher,
    read_teacher,
    step_loss,
    target_logprobs,
)
from opd.engines.verl import fields as F
from opd.engines.verl.heads import captured_hidden, output_embedding
from opd.engines.verl.tensors import (
    PackedLayout,
    from_nested,
    join_slots,
    packed_next_tokens,
    packed_to_response,
    response_to_packed,
    split_slots,
)

# micro-batch shares of the mini-batch loss: they add up
LOSS_METRICS_SUMMED = ("actor/pg_loss", "actor/kl_loss", "actor/full_vocab_loss")


@dataclass(frozen=True)
class HookSpec:
    """What every hook needs, pickled once into the workers (`set_loss_fn`)."""

    algo: OPDConfig  # temperatures 1: verl has already divided the logits by the pass's temperature
    reads_k: int  # top-k width of the read passes
    norm_length: int  # seq-mean-token-sum-norm divisor (data.max_response_length)
    vocab_width: int | None = None  # read only the first columns of the logits (a padded output layer)
    teacher_path: str | None = None  # full vocabulary: the checkpoint the teacher's output embedding is read from
    teacher_temperature: float = 1.0  # full vocabulary: the teacher's head logits are divided by it in the actor

    @property
    def full_vocab(self) -> bool:
        return self.algo.support == "full"


def _phase(data) -> str | None:
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=data, key=F.PHASE, default=None)


def _rows(spec: HookSpec, student_logits: torch.Tensor, data) -> torch.Tensor:
    """The hook's logits as the core's [1, L, V]: one sequence of packed rows, cut to the shared vocabulary."""
    n_rows = data["input_ids"].values().shape[0]
    if student_logits.dim() != 3 or student_logits.shape[:2] != (1, n_rows):
        raise ValueError(
            f"OPD logits hook got logits of shape {tuple(student_logits.shape)} for {n_rows} packed rows:"
            f" sequence parallelism and packed-length padding (pad_to_length) are not supported"
        )
    return student_logits if spec.vocab_width is None else student_logits[..., : spec.vocab_width]


def _slots(data, name: str, k: int, dtype=None) -> torch.Tensor:
    """K per-row fields of a read pass (nested over prompt + response rows) as [1, L, K]."""
    x = join_slots(data, name, k, convert=lambda nested: nested.values())
    return (x if dtype is None else x.to(dtype))[None]


def _zero_loss(data):
    return torch.zeros((), device=data["input_ids"].values().device), {}


@torch.no_grad()
def _read_student(spec: HookSpec, logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
    ids = packed_next_tokens(data["input_ids"]).to(logits.device)[None]
    stats = read_student(spec.algo, logits, ids)
    out = {F.STUDENT_LP: stats.lp_NT[0], F.STUDENT_ENTROPY: stats.entropy_NT[0]}
    out.update(split_slots(stats.topk_ids_NTK[0], F.STUDENT_TOPK_IDS))
    out.update(split_slots(stats.topk_lp_NTK[0], F.STUDENT_TOPK_LP))
    return out


@torch.no_grad()
def _read_student_at_teacher(spec: HookSpec, logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
    teacher_ids = _slots(data, F.TEACHER_TOPK_IDS, spec.reads_k, torch.long).to(logits.device)
    lp = read_student_at_teacher(spec.algo, logits, teacher_ids)
    if lp is None:
        raise ValueError(
            f"top_k_strategy={spec.algo.top_k_strategy!r} reads no student log-probs at the teacher's "
            f"ids: the {F.READ_STUDENT_AT_TEACHER} pass should not run"
        )
    return split_slots(lp[0], F.STUDENT_AT_TEACHER)


@torch.no_grad()
def _read_teacher(spec: HookSpec, logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
    ids = packed_next_tokens(data["input_ids"]).to(logits.device)[None]
    student_ids = _slots(data, F.STUDENT_TOPK_IDS, spec.reads_k, torch.long).to(logits.device)
    stats = read_teacher(spec.algo, logits, ids, student_ids)
    out = {F.TEACHER_LP: stats.lp_NT[0], F.TEACHER_ENTROPY: stats.entropy_NT[0]}
    out.update(split_slots(stats.topk_ids_NTK[0], F.TEACHER_TOPK_IDS))
    out.update(split_slots(stats.topk_lp_NTK[0], F.TEACHER_TOPK_LP))
    out.update(split_slots(stats.lp_at_other_NTK[0], F.TEACHER_AT_STUDENT))
    if spec.full_vocab:  # its final hidden states, for the student's full-vocabulary passes (see `heads`)
        lengths = data["input_ids"].offsets().diff()
        out.update(split_slots(captured_hidden(logits, spec.teacher_temperature, lengths), F.TEACHER_HIDDEN_ROW))
    return out


def _teacher_head(spec: HookSpec, data, layout: PackedLayout, device) -> tuple[OutputHead, torch.Tensor]:
    """(the teacher's head at its hidden states [R, H], the packed rows R they belong to), R = the response rows."""
    weight, bias = output_embedding(spec.teacher_path, spec.vocab_width, device)
    hidden = data[F.TEACHER_HIDDEN].values().to(device)
    rows, _, _ = layout.response_rows()
    if hidden.shape[0] != rows.shape[0]:
        raise ValueError(f"{F.TEACHER_HIDDEN} holds {hidden.shape[0]} rows for {rows.shape[0]} response tokens")
    return OutputHead(hidden, weight, bias), rows.to(device)


@torch.no_grad()
def _read_full_kl(spec: HookSpec, logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
    layout = PackedLayout.from_nested(data["input_ids"], data["responses"])
    head, rows = _teacher_head(spec, data, layout, logits.device)
    kl = full_vocab_reverse_kl_at_rows(
        logits, rows, head, teacher_temperature=spec.teacher_temperature, chunk_size=spec.algo.chunk_size
    )
    return {F.FULL_KL: logits.new_zeros(layout.n_rows, dtype=torch.float32).index_put((rows,), kl)}


def _info(data, key: str, default):
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=data, key=key, default=default)


def _slot_layout(data) -> tuple[int, bool, bool]:
    return int(_info(data, F.N_SLOTS, 0)), bool(_info(data, F.HAS_TAIL, False)), bool(_info(data, F.EXTRA_SLOT, False))


def _targets(data, layout: PackedLayout, *, packed: bool, with_values: bool) -> Targets:
    """The micro-batch's targets from its nested fields: [1, L, C] per packed row, or [n, T, C] per response."""
    n_slots, has_tail, extra = _slot_layout(data)
    T = layout.width

    def field(name, dtype, fill=0):
        resp = from_nested(data[name], T).to(dtype)
        return response_to_packed(resp, layout, fill=fill)[None] if packed else resp

    ids = field(F.TARGET_IDS, torch.long)
    valid = field(F.TARGET_VALID, torch.bool, fill=False)
    if ids.shape[-1] != n_slots:
        raise ValueError(f"the update's targets have {ids.shape[-1]} slots; extra_info says {n_slots}")
    mask = from_nested(data[F.LOSS_MASK], T).float()
    old = field(F.TARGET_OLD_LP, torch.float32) if with_values else torch.zeros(ids.shape)
    adv = field(F.TARGET_ADV, torch.float32) if with_values and _info(data, F.HAS_ADV, True) else None
    ref = field(F.TARGET_REF_LP, torch.float32) if with_values and F.TARGET_REF_LP in data.keys() else None
    # `support` is read only by the diagnostics, which run on the driver
    return Targets(
        ids_NTC=ids,
        valid_NTC=valid,
        old_lp_NTC=old,
        adv_NTC=adv,
        response_mask_NT=mask,
        support=None,
        has_tail=has_tail,
        extra_sampled_slot=extra,
        full_vocab=False,
        ref_lp_NTC=ref,
    )


def _slot_logprobs(spec: HookSpec, logits: torch.Tensor, data) -> torch.Tensor:
    """[L, C] log-probs at the update's target slots per packed row (differentiable when `logits` are)."""
    layout = PackedLayout.from_nested(data["input_ids"], data["responses"])
    targets = _targets(data, layout, packed=True, with_values=False)
    targets.ids_NTC, targets.valid_NTC = targets.ids_NTC.to(logits.device), targets.valid_NTC.to(logits.device)
    return target_logprobs(spec.algo, logits, targets)[0]


@torch.no_grad()
def _read_reference(spec: HookSpec, logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
    return split_slots(_slot_logprobs(spec, logits, data), F.REF_LP_ROW)


def _needs_slots(spec: HookSpec, data) -> bool:
    """Whether the loss reads log p at the target slots: slot advantages, or the KL-to-reference term."""
    return bool(_info(data, F.HAS_ADV, True)) or spec.algo.use_kl


def _update_rows(spec: HookSpec, logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
    """log p at every target slot, per packed row, with gradient (the K dimension travels as C keys)."""
    layout = PackedLayout.from_nested(data["input_ids"], data["responses"])
    targets = _targets(data, layout, packed=True, with_values=False)
    targets.ids_NTC, targets.valid_NTC = targets.ids_NTC.to(logits.device), targets.valid_NTC.to(logits.device)
    out = {}
    if _needs_slots(spec, data):  # with the full vocabulary alone (no outcome advantage, no KL) no slot is read
        out.update(split_slots(target_logprobs(spec.algo, logits, targets)[0], F.UPDATE_LP))
    if _info(data, F.FULL_VOCAB, False):  # the surrogate per response row, against the teacher's head
        head, rows = _teacher_head(spec, data, layout, logits.device)
        loss_R = full_vocab_pg_loss_at_rows(
            logits,
            rows,
            head,
            spec.algo.reward_weight_mode,
            teacher_temperature=spec.teacher_temperature,
            chunk_size=spec.algo.chunk_size,
        )
        out[F.FULL_PG] = loss_R.new_zeros(layout.n_rows).index_put((rows,), loss_R)
    if F.TEACHER_TOP1 in data.keys():  # the probe: log p at the teacher's argmax, no gradient
        top1 = response_to_packed(from_nested(data[F.TEACHER_TOP1], layout.width).long(), layout)
        probe = Targets(
            ids_NTC=top1[None, :, None].to(logits.device),
            valid_NTC=torch.ones(1, layout.n_rows, 1, dtype=torch.bool, device=logits.device),
            old_lp_NTC=None,
            adv_NTC=None,
            response_mask_NT=None,
            support=None,
            has_tail=False,
            extra_sampled_slot=False,
            full_vocab=False,
        )
        with torch.no_grad():
            out[F.PROBE_LP] = target_logprobs(spec.algo, logits, probe)[0, :, 0]
    return out


def _update_loss(spec: HookSpec, model_output, data):
    """The OPD loss of one micro-batch, normalised by the mini-batch's global counts (see the module docstring)."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import AggregationType, Metric

    layout = PackedLayout.from_nested(data["input_ids"], data["responses"])
    targets = _targets(data, layout, packed=False, with_values=True)
    device = next(iter(model_output.values())).values().device
    for name in ("ids_NTC", "valid_NTC", "old_lp_NTC", "adv_NTC", "response_mask_NT", "ref_lp_NTC"):
        if getattr(targets, name) is not None:
            setattr(targets, name, getattr(targets, name).to(device))
    dp_size = int(tu.get_non_tensor_data(data=data, key="dp_size", default=1))
    batch_tokens = tu.get_non_tensor_data(data=data, key="batch_num_tokens", default=None)
    batch_seqs = tu.get_non_tensor_data(data=data, key="global_batch_size", default=None)
    if batch_tokens is None:  # called outside verl's training loop (a test): this micro-batch is the batch
        batch_tokens = float(targets.response_mask_NT.sum())
    if batch_seqs is None:
        batch_seqs = float(layout.response_lengths.numel())
    totals = BatchTotals(
        norm_length=float(spec.norm_length),
        total_tokens=float(batch_tokens) / dp_size,
        total_seqs=float(batch_seqs) / dp_size,
    )
    loss, core_metrics = torch.zeros((), device=device), {}
    if _needs_slots(spec, data):  # the slot terms (policy loss, KL; the full vocabulary's is added below)
        lp = join_slots(
            model_output,
            F.UPDATE_LP,
            targets.ids_NTC.shape[-1],
            convert=lambda nested: packed_to_response(nested.values(), layout),
        )
        loss, core_metrics = step_loss(spec.algo, targets, None, lp_NTC=lp, totals=totals)
    if F.FULL_PG in model_output.keys():
        per_pos = packed_to_response(model_output[F.FULL_PG].values(), layout)
        full, full_metrics = full_vocab_term(spec.algo, per_pos, targets.response_mask_NT, totals)
        loss = loss + full
        core_metrics.update(full_metrics)
    metrics = {}
    for key, value in core_metrics.items():
        if key == "actor/loss":  # verl logs the summed micro-batch losses itself as actor/loss
            continue
        kind = AggregationType.SUM if key in LOSS_METRICS_SUMMED else AggregationType.MEAN
        metrics[key.removeprefix("actor/")] = Metric(value=value, aggregation=kind)
    if F.PROBE_LP in model_output.keys():
        probe = packed_to_response(model_output[F.PROBE_LP].values().detach(), layout)
        real = layout.response_mask(probe.device)
        metrics[F.PROBE_SUM] = Metric(value=float((probe * real).sum()), aggregation=AggregationType.SUM)
        metrics[F.PROBE_COUNT] = Metric(value=float(real.sum()), aggregation=AggregationType.SUM)
    return loss, metrics


def actor_loss(spec: HookSpec, student_logits=None, data=None, model_output=None, dp_group=None):
    """The actor's loss function (`actor_rollout_wg.set_loss_fn`): reads in the read passes, the OPD update."""
    phase = _phase(data)
    if student_logits is not None:
        logits = _rows(spec, student_logits, data)
        if phase == F.READ_STUDENT:
            return _read_student(spec, logits, data)
        if phase == F.READ_STUDENT_AT_TEACHER:
            return _read_student_at_teacher(spec, logits, data)
        if phase == F.READ_FULL_KL:
            return _read_full_kl(spec, logits, data)
        if phase == F.UPDATE:
            return _update_rows(spec, logits, data)
        if phase == F.READ_REFERENCE:
            return _read_reference(spec, logits, data)
    elif phase in (F.READ_STUDENT, F.READ_STUDENT_AT_TEACHER, F.READ_FULL_KL, F.READ_REFERENCE):
        return _zero_loss(data)
    elif phase == F.UPDATE:
        return _update_loss(spec, model_output, data)
    raise ValueError(
        f"the OPD actor loss was called with {F.PHASE}={phase!r} "
        f"({'logits hook' if student_logits is not None else 'loss'} call): only the OPD trainer mode's "
        f"passes set it"
    )


def teacher_loss(spec: HookSpec, student_logits=None, data=None, model_output=None, dp_group=None):
    """The teacher worker group's loss function: one read pass, no loss ("student_logits" are the teacher's)."""
    phase = _phase(data)
    if phase != F.READ_TEACHER:
        raise ValueError(f"the OPD teacher was called with {F.PHASE}={phase!r}; expected {F.READ_TEACHER!r}")
    if student_logits is not None:
        return _read_teacher(spec, _rows(spec, student_logits, data), data)
    return _zero_loss(data)
