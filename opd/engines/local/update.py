"""The update: re-run the student with gradient, score it at the stored targets, one AdamW step.

One mini-batch, one epoch, one optimiser step per training step (on-policy, ratio = 1 up to float noise). Gradient
accumulation over micro-batches (token budget) passes the whole batch's token / sequence counts to the core's loss,
so the summed micro-batch losses equal the full-batch loss and micro-batching never changes the gradient.
The loss is the core's `step_loss` (policy loss on the [N, T, C] targets with the K dimension kept, the
full-vocabulary surrogate and the KL-to-reference term). The student enters as its final hidden states and output
embedding (`OutputHead`): its slot log-probs and the full-vocabulary surrogate (against the teacher's head, its
hidden states kept from the scoring pass) are built chunk by chunk, so no [T, V] logits exist, nor their gradient.
A model whose logits are not its head at its last hidden state falls back to logits (with the full vocabulary the
teacher then re-runs here without grad). A non-finite gradient norm skips the optimiser step.
"""

from __future__ import annotations

import math
import warnings

import torch

from opd.core.config import OPDConfig
from opd.core.step import Targets, loss_totals, merge_loss_metrics, needs_student_logits, step_loss
from opd.engines.local.heads import has_output_head, output_head, response_hidden
from opd.engines.local.rollout import RolloutBatch, micro_batch_bounds
from opd.engines.local.scoring import response_logits
from opd.optim import clip_grad_norm


def loss_and_backward(
    student,
    batch: RolloutBatch,
    targets: Targets,
    cfg: OPDConfig,
    *,
    token_budget: int,
    norm_length: int,
    teacher=None,
    vocab_size: int | None = None,
    teacher_hidden: list[torch.Tensor] | None = None,
    full_kl_NT: torch.Tensor | None = None,
) -> dict[str, float]:
    """Accumulate the gradient of the full-batch loss over micro-batches; returns loss metrics.

    `teacher_hidden`: the teacher's final hidden states per micro-batch, kept by `score`; then the full-vocabulary
    term runs from both models' output heads (no [T, V] logits, no second teacher forward), and `full_kl_NT`, when
    given ([N, T]), receives the exact reverse KL per position for the diagnostics."""
    totals = loss_totals(targets, norm_length)
    parts = []
    for i, (start, stop) in enumerate(micro_batch_bounds(batch, token_budget)):
        mb = batch.rows(start, stop)
        tg = targets.rows(start, stop, mb.resp_width)
        if teacher_hidden is not None or (not tg.full_vocab and has_output_head(student)):
            s_head = output_head(student, response_hidden(student, mb), vocab_size)
            full = {}
            if teacher_hidden is not None:
                full = dict(
                    student_head=s_head,
                    teacher_head=output_head(teacher, teacher_hidden[i], vocab_size),
                    full_kl_out_NT=None if full_kl_NT is None else full_kl_NT[start:stop, : mb.resp_width],
                )
            source = s_head if needs_student_logits(cfg, tg) else None
            loss, metrics = step_loss(cfg, tg, source, totals=totals, **full)
        else:
            logits = response_logits(student, mb, vocab_size)
            teacher_logits = None
            if tg.full_vocab:
                with torch.no_grad():
                    teacher_logits = response_logits(teacher, mb, vocab_size)
            loss, metrics = step_loss(cfg, tg, logits, totals=totals, teacher_logits_NTV=teacher_logits)
        loss.backward()
        parts.append((metrics, float(tg.response_mask_NT.sum())))
    return merge_loss_metrics(parts, totals)


def optimizer_step(model, optimizer, scheduler, *, grad_clip: float) -> dict[str, float]:
    """Clip, step (unless the gradient norm is not finite), advance the schedule, clear gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = clip_grad_norm(params, grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    with warnings.catch_warnings():  # a skipped step still advances the schedule (it counts training steps)
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"actor/grad_norm": grad_norm, "actor/lr": lr, "actor/skipped_step": float(skipped)}
