"""Full-vocabulary OPD when the two models live in different processes: the student's logits against the teacher's
output head (its final hidden states and output embedding), which rebuilds the teacher's logits chunk by chunk.

Why: an engine that runs the teacher in a worker group of its own (the verl engine) cannot hand the teacher's
[T, V] logits to the student's update (V floats per position across a process boundary). Its final hidden states
are H floats per position (H << V), and its output embedding [V, H] is the same for every position, so the update
rebuilds any chunk of the teacher's logits where the student's logits are. The maths is `opd.core.full_vocab`'s
(`_chunk_advantage`, the surrogate and its gradient); only where the teacher's rows come from differs.

Both functions read the student's logits at a subset of their rows (`rows_R`: the response positions of a packed
micro-batch), aligned with the teacher's hidden states [R, H]; other rows get no value and no gradient.
"""

from __future__ import annotations

import torch

from opd.core.config import OPDConfig
from opd.core.full_vocab import OutputHead, _check_settings, _chunk_advantage
from opd.core.logits import DEFAULT_CHUNK_SIZE
from opd.core.loss import BatchTotals, agg_loss

__all__ = ["full_vocab_pg_loss_at_rows", "full_vocab_reverse_kl_at_rows", "full_vocab_term"]


def _check(student_LV: torch.Tensor, rows_R: torch.Tensor, teacher: OutputHead, chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not valid; expected >= 1")
    if rows_R.dim() != 1 or teacher.hidden_NTH.dim() != 2 or teacher.hidden_NTH.shape[0] != rows_R.shape[0]:
        raise ValueError(
            f"rows {tuple(rows_R.shape)} and teacher hidden states {tuple(teacher.hidden_NTH.shape)} must be [R] and "
            "[R, H]"
        )
    if teacher.weight_VH.shape[0] != student_LV.shape[-1]:
        raise ValueError(
            f"student logits have {student_LV.shape[-1]} columns and the teacher's head {teacher.weight_VH.shape[0]} "
            "rows; teacher and student must share the vocabulary"
        )


def _teacher_rows(teacher: OutputHead, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of the teacher's logits (before its temperature); the matmul in the head's dtype."""
    w = teacher.weight_VH
    h = teacher.hidden_NTH[start:stop].to(w.dtype)
    return torch.nn.functional.linear(h, w, None if teacher.bias_V is None else teacher.bias_V.to(w.dtype))


class _FullVocabPGTeacherHead(torch.autograd.Function):
    """loss_r = -sum_v A_r(v) at the given rows of the student's logits; A is recomputed chunk by chunk in backward,
    so neither model's logits are copied beyond one chunk (the gradient itself is the student logits' size)."""

    @staticmethod
    def forward(ctx, student_LV, rows_R, t_hidden, t_weight, t_bias, tau, teacher_tau, weight_mode, chunk_size):  # type: ignore[override]
        teacher = OutputHead(t_hidden, t_weight, t_bias)
        loss_R = torch.empty(rows_R.shape[0], dtype=torch.float32, device=student_LV.device)
        for start in range(0, rows_R.shape[0], chunk_size):
            stop = min(start + chunk_size, rows_R.shape[0])
            adv_RV, _ = _chunk_advantage(
                student_LV[rows_R[start:stop]], _teacher_rows(teacher, start, stop), tau, teacher_tau, weight_mode
            )
            loss_R[start:stop] = -adv_RV.sum(-1)
        ctx.save_for_backward(student_LV, rows_R, t_hidden, t_weight, *(() if t_bias is None else (t_bias,)))
        ctx.args = (tau, teacher_tau, weight_mode, chunk_size)
        return loss_R

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_R):  # type: ignore[override]
        student_LV, rows_R, t_hidden, t_weight, *bias = ctx.saved_tensors
        teacher = OutputHead(t_hidden, t_weight, bias[0] if bias else None)
        tau, teacher_tau, weight_mode, chunk_size = ctx.args
        grad_LV = torch.zeros_like(student_LV)
        grad_R = grad_R.to(torch.float32)
        for start in range(0, rows_R.shape[0], chunk_size):
            stop = min(start + chunk_size, rows_R.shape[0])
            rows = rows_R[start:stop]
            adv_RV, p_RV = _chunk_advantage(
                student_LV[rows], _teacher_rows(teacher, start, stop), tau, teacher_tau, weight_mode
            )
            # dL/dx = -(A - p * sum A) / tau, times the incoming gradient of each row (as `full_vocab_pg_loss_NT`)
            g_RV = p_RV.mul_(adv_RV.sum(-1, keepdim=True)).sub_(adv_RV)
            g_RV.mul_((grad_R[start:stop] / tau)[:, None])
            grad_LV.index_put_((rows,), g_RV.to(grad_LV.dtype), accumulate=True)
        return grad_LV, None, None, None, None, None, None, None, None


def _flat(student_logits: torch.Tensor) -> torch.Tensor:
    return student_logits.reshape(-1, student_logits.shape[-1])


def full_vocab_pg_loss_at_rows(
    student_logits: torch.Tensor,
    rows_R: torch.Tensor,
    teacher: OutputHead,
    weight_mode: str = "student_p",
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """The `full_vocab_pg_loss_NT` surrogate L_r = -sum_v A_r(v), float32 [R], at rows `rows_R` of the student's
    logits ([..., V], flattened to rows), against the teacher's head at its hidden states [R, H] (one per row).

    Differentiable w.r.t. the student's logits only (the teacher is a constant); equal in value and gradient to
    `full_vocab_pg_loss_NT(student_logits[rows], head logits)`, but the teacher's logits exist one chunk at a time
    (extra memory: a few chunk_size x V float32 buffers, plus the gradient, which autograd needs anyway)."""
    _check_settings(weight_mode, temperature, teacher_temperature)
    _check(student_logits, rows_R, teacher, chunk_size)
    t_bias = None if teacher.bias_V is None else teacher.bias_V.detach()
    return _FullVocabPGTeacherHead.apply(
        _flat(student_logits),
        rows_R.long(),
        teacher.hidden_NTH.detach(),
        teacher.weight_VH.detach(),
        t_bias,
        float(temperature),
        float(teacher_temperature),
        weight_mode,
        int(chunk_size),
    )


@torch.no_grad()
def full_vocab_reverse_kl_at_rows(
    student_logits: torch.Tensor,
    rows_R: torch.Tensor,
    teacher: OutputHead,
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Exact KL_r = sum_v p_r(v) (lp_r(v) - lq_r(v)), float32 [R], at rows `rows_R` of the student's logits against
    the teacher's head (`full_vocab_reverse_kl`'s value); no gradient. KL is the student_p surrogate's value."""
    _check_settings("student_p", temperature, teacher_temperature)
    _check(student_logits, rows_R, teacher, chunk_size)
    flat, rows_R = _flat(student_logits), rows_R.long()
    kl_R = torch.empty(rows_R.shape[0], dtype=torch.float32, device=flat.device)
    for start in range(0, rows_R.shape[0], chunk_size):
        stop = min(start + chunk_size, rows_R.shape[0])
        adv_RV, _ = _chunk_advantage(
            flat[rows_R[start:stop]], _teacher_rows(teacher, start, stop), temperature, teacher_temperature, "student_p"
        )
        kl_R[start:stop] = -adv_RV.nan_to_num_(nan=0.0).sum(-1)
    return kl_R


def full_vocab_term(
    cfg: OPDConfig, loss_NT: torch.Tensor, mask_NT: torch.Tensor, totals: BatchTotals
) -> tuple[torch.Tensor, dict[str, float]]:
    """The full-vocabulary term of `step_loss` from a precomputed per-position surrogate (`full_vocab_pg_loss_at_rows`
    laid out [N, T]): the same aggregation, and its metric under the same name."""
    full = agg_loss(loss_NT, mask_NT, cfg.loss_agg_mode, totals).float()
    return full, {"actor/full_vocab_loss": float(full.detach())}
