"""The no-grad passes of a step: student, teacher (and reference) forwards, micro-batched by a token budget.

The engine only moves tensors: what is read from the logits is `opd.core.step` (read_student, read_teacher, ...).
Per micro-batch the student and the teacher each run once in eval mode; their logits live only inside the
micro-batch, and only [N, T, K]-sized reads are kept. The student's log-probs at the teacher's top-k ids reuse the
student logits (or head) of the same micro-batch (no third forward), and only when the strategy needs them.
A model that exposes its output embedding (`opd.engines.local.heads`) is read from its final hidden states chunk by
chunk (`opd.core.logits.head_logit_stats`): its [n, T, V] logits are never built. With the full vocabulary the
teacher's hidden states are kept (`teacher_hidden`) for the update.
"""

from __future__ import annotations

import time
from dataclasses import fields, is_dataclass

import torch

from opd.core.config import OPDConfig
from opd.core.step import (
    ModelStats,
    OutputHead,
    StepReads,
    Targets,
    read_full_kl,
    read_student,
    read_student_at_teacher,
    read_teacher,
    student_reads_suffice,
    target_logprobs,
)
from opd.engines.local.heads import has_output_head, head_logits, output_head, response_hidden
from opd.engines.local.rollout import RolloutBatch, micro_batch_bounds


def response_logits(model, mb: RolloutBatch, vocab_size: int | None = None) -> torch.Tensor:
    """Logits predicting each response token, [n, T, V]: one forward, logits kept only for the response columns."""
    position_ids = (mb.attention_mask_NL.cumsum(-1) - 1).clamp_min(0)
    out = model(
        input_ids=mb.input_ids_NL,
        attention_mask=mb.attention_mask_NL,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=mb.resp_width + 1,
    )
    logits = out.logits[:, :-1]
    return logits if vocab_size is None else logits[..., :vocab_size]


def _source(model, mb: RolloutBatch, vocab_size: int | None, *, head: bool, keep: list | None = None):
    """What a model's reads are taken from: its `OutputHead` where it has one and `head` allows it (the reads are
    the same, and its [n, T, V] logits are never built), else its logits. `keep`, when given, receives the final
    hidden states (the full-vocabulary update rebuilds the teacher's logits from them)."""
    if keep is None and not (head and has_output_head(model)):
        return response_logits(model, mb, vocab_size)
    hidden = response_hidden(model, mb)
    if keep is not None:
        keep.append(hidden)
    return output_head(model, hidden, vocab_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def score(
    student,
    teacher,
    batch: RolloutBatch,
    cfg: OPDConfig,
    *,
    token_budget: int,
    vocab_size: int | None = None,
    timings: dict[str, float] | None = None,
    teacher_hidden: list[torch.Tensor] | None = None,
    student_reads: ModelStats | None = None,
) -> StepReads:
    """Student (and teacher) no-grad passes over the batch, micro-batched by `token_budget`.

    `timings`, when given, accumulates the seconds spent in each model's pass ("student", "teacher").
    `teacher_hidden`, when given (a list, and the teacher `has_output_head`), receives the teacher's final hidden
    states of each micro-batch: the full-vocabulary update rebuilds its logits from them instead of re-running it.
    `student_reads` (from `SamplerReads`, allowed when `student_reads_suffice`) replace the student's forward; with
    the full vocabulary the exact KL is then left to the update (`loss_and_backward(..., full_kl_NT=)`).
    """
    if student_reads is not None and not student_reads_suffice(cfg, kl_from_update=True):
        raise ValueError("student_reads from the sampler cannot serve this configuration (it needs student logits)")
    clock = timings if timings is not None else {}
    clock.setdefault("student", 0.0)
    clock.setdefault("teacher", 0.0)
    N, T = batch.response_ids_NT.shape
    parts: list[StepReads] = []
    for start, stop in micro_batch_bounds(batch, token_budget):
        mb = batch.rows(start, stop)
        t0 = time.perf_counter()
        if student_reads is None:
            s_logits = _source(student, mb, vocab_size, head=cfg.support != "full")
            reads = StepReads(student=read_student(cfg, s_logits, mb.response_ids_NT))
            _sync(batch.response_ids_NT.device)
        else:
            s_logits = None
            reads = StepReads(student=_rows(student_reads, start, stop, mb.resp_width))
        t1 = time.perf_counter()
        clock["student"] += t1 - t0
        if teacher is not None:
            t_source = _source(teacher, mb, vocab_size, head=True, keep=teacher_hidden)
            reads.teacher = read_teacher(cfg, t_source, mb.response_ids_NT, reads.student.topk_ids_NTK)
            reads.student.lp_at_other_NTK = read_student_at_teacher(cfg, s_logits, reads.teacher.topk_ids_NTK)
            if s_logits is not None and cfg.support == "full":  # the student's logits: it has no usable head
                t_logits = head_logits(t_source) if isinstance(t_source, OutputHead) else t_source
                reads.full_kl_NT = read_full_kl(cfg, s_logits, t_logits)
                del t_logits
            del t_source
            _sync(batch.response_ids_NT.device)
            clock["teacher"] += time.perf_counter() - t1  # the student-at-teacher-ids and full-vocab reads too
        del s_logits
        parts.append(reads)
    return _pad_cat(parts, N, T)


def _rows(stats: ModelStats, start: int, stop: int, width: int) -> ModelStats:
    return ModelStats(
        **{f.name: None if (v := getattr(stats, f.name)) is None else v[start:stop, :width] for f in fields(stats)}
    )


class SamplerReads:
    """The student's reads taken from the sampler's own next-token logits, position by position (pass it as the
    sampler's `observe`): the sampling policy's exact statistics, and the scoring pass skips the student forward.
    They equal a separate no-grad pass up to the float noise between a KV-cached and a full forward.

    The positions' logits are buffered (references to the sampler's outputs, up to `BUFFER_ELEMENTS` logits) and
    read in one `read_student` call per buffer: the same row-wise reads as one call per position, without paying
    the reads' fixed per-call cost at every sampled token (at a small vocabulary that cost was most of it)."""

    # 4 MiB of float32: all positions of 8 rows x 32 tokens at V = 273 in one call; at V = 151,936 one position a
    # call, as before (a bigger buffer there saves nothing measurable and its reads' float32 copies add to the peak)
    BUFFER_ELEMENTS = 1 << 20

    def __init__(self, cfg: OPDConfig, n_rows: int, max_new_tokens: int, vocab_size: int | None = None):
        self.cfg, self.n_rows, self.width, self.vocab_size = cfg, n_rows, max_new_tokens, vocab_size
        self._parts: dict[str, torch.Tensor] = {}
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (logits [B, V], token [B]) per position
        self._at: tuple[int, int] = (0, 0)  # (first row, first position) of the buffered positions

    def __call__(self, first: int, step: int, logits_BV: torch.Tensor, token_B: torch.Tensor) -> None:
        logits = logits_BV[:, : self.vocab_size] if self.vocab_size else logits_BV
        if self._pending and (first, step) != (self._at[0], self._at[1] + len(self._pending)):
            self._flush()  # a new batch of rows, or a gap in positions
        if not self._pending:
            self._at = (first, step)
        self._pending.append((logits, token_B))
        if len(self._pending) * logits.numel() >= self.BUFFER_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        logits_BSV = torch.stack([lg for lg, _ in self._pending], dim=1)
        token_BS = torch.stack([tok for _, tok in self._pending], dim=1)
        self._pending = []
        token_BS = token_BS.clamp(0, logits_BSV.shape[-1] - 1)  # finished rows hold the pad id: masked later
        stats = read_student(self.cfg, logits_BSV, token_BS)
        first, step = self._at
        rows, cols = slice(first, first + token_BS.shape[0]), slice(step, step + token_BS.shape[1])
        for f in fields(stats):
            value = getattr(stats, f.name)
            if value is None:
                continue
            if f.name not in self._parts:
                shape = (self.n_rows, self.width, *value.shape[2:])
                self._parts[f.name] = torch.zeros(shape, dtype=value.dtype, device=value.device)
            self._parts[f.name][rows, cols] = value

    def stats(self, width: int) -> ModelStats:
        """The reads over the batch's response columns, [N, width, ...]."""
        self._flush()
        return ModelStats(**{name: value[:, :width] for name, value in self._parts.items()})


def _pad_cat(parts, N: int, T: int):
    """Concatenate per-micro-batch results (each trimmed to its own T') into one [N, T, ...] batch, zero-padded;
    dataclasses (StepReads, ModelStats) field by field."""
    first = parts[0]
    if first is None:
        return None
    if is_dataclass(first):
        return type(first)(**{f.name: _pad_cat([getattr(p, f.name) for p in parts], N, T) for f in fields(first)})
    out = torch.zeros((N, T, *first.shape[2:]), dtype=first.dtype, device=first.device)
    row = 0
    for c in parts:
        out[row : row + c.shape[0], : c.shape[1]] = c
        row += c.shape[0]
    return out


@torch.no_grad()
def reference_logprobs(
    reference,
    batch: RolloutBatch,
    targets: Targets,
    cfg: OPDConfig,
    *,
    token_budget: int,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """USE_KL: the frozen reference policy's log-probs at the target slots, [N, T, C]."""
    N, T = batch.response_ids_NT.shape
    chunks = []
    for start, stop in micro_batch_bounds(batch, token_budget):
        mb = batch.rows(start, stop)
        source = _source(reference, mb, vocab_size, head=True)
        chunks.append(target_logprobs(cfg, source, targets.rows(start, stop, mb.resp_width)))
    return _pad_cat(chunks, N, T)
