"""Full-vocabulary OPD: the exact per-position reverse KL and its policy-gradient loss term (LOG_PROB_TOP_K = -1).

The support is the whole vocabulary, so the candidate "slots" would be [N, T, V]: far too large to store. Both
functions therefore walk positions in chunks of `chunk_size` rows, upcasting one chunk of each model's logits to
float32 at a time; peak extra memory is about 4 chunk_size * V float32 buffers (measured with
bench/bench_rewards.py: 594 MiB at chunk 256, V = 151,936), whatever N * T is.

Loss term. With A_t(v) = w_t(v) * (lq_t(v) - lp_t(v)) (w = p for student_p, q for teacher_p, 1/V for none: the
vocabulary-normalised weights of docs/algorithm.md §3), the on-policy PPO surrogate at ratio 1 is
    L_t = -sum_v A_t(v)            (value; equals KL_t exactly for student_p)
    grad L_t = -sum_v sg(A_t(v)) * grad lp_t(v)
and with lp = x / tau - logsumexp(x / tau) this is, per logit x_u,
    dL_t / dx_u = -(A_t(u) - p_t(u) * sum_v A_t(v)) / tau.
A custom autograd.Function recomputes A chunk by chunk in backward, so nothing [N, T, V]-sized in float32 is kept.
Logits are expected finite (real model outputs); -inf logits would make A undefined.
"""

from __future__ import annotations

import torch

from opd.core.logits import (
    DEFAULT_CHUNK_SIZE,
    RowChunks,
    _check_temperature,
    _float_chunk,
    _head_chunk,
    hidden_chunk_rows,
)
from opd.core.types import OutputHead

# The weightings this kernel implements in closed form over the vocabulary (a weight mode registered by a plugin
# works on slot supports; over the full vocabulary it needs its own kernel here).
FULL_VOCAB_WEIGHT_MODES = ("student_p", "teacher_p", "none")


def _check_settings(weight_mode: str, temperature: float, teacher_temperature: float) -> None:
    if weight_mode not in FULL_VOCAB_WEIGHT_MODES:
        raise ValueError(
            f"weight_mode={weight_mode!r} is not valid for the full vocabulary; allowed: "
            f"{', '.join(FULL_VOCAB_WEIGHT_MODES)}"
        )
    _check_temperature(temperature)
    _check_temperature(teacher_temperature)


def _check_pair(student_logits_NTV: torch.Tensor, teacher_logits_NTV: torch.Tensor) -> None:
    if student_logits_NTV.shape != teacher_logits_NTV.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_NTV.shape)} and teacher logits {tuple(teacher_logits_NTV.shape)} "
            "differ; teacher and student must share the vocabulary and score the same positions"
        )


def _chunk_logprobs(rows_RV: torch.Tensor, temperature: float) -> torch.Tensor:
    x_RV = _float_chunk(rows_RV, temperature)
    return x_RV.sub_(torch.logsumexp(x_RV, dim=-1, keepdim=True))


@torch.no_grad()
def full_vocab_reverse_kl(
    student_logits_NTV: torch.Tensor,
    teacher_logits_NTV: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Exact KL_t = sum_v p_t(v) (lp_t(v) - lq_t(v)), float32 [N, T]; no gradient.

    p = softmax(student / temperature), q = softmax(teacher / teacher_temperature). Terms with p = 0 count as 0.
    """
    _check_temperature(temperature)
    _check_temperature(teacher_temperature)
    _check_pair(student_logits_NTV, teacher_logits_NTV)
    s_chunks, t_chunks = RowChunks(student_logits_NTV, chunk_size), RowChunks(teacher_logits_NTV, chunk_size)
    kl_R = torch.empty(s_chunks.n_rows, dtype=torch.float32, device=student_logits_NTV.device)
    for start, stop in s_chunks.ranges():
        lp_RV = _chunk_logprobs(s_chunks.rows(start, stop), temperature)
        diff_RV = _chunk_logprobs(t_chunks.rows(start, stop), teacher_temperature).neg_().add_(lp_RV)  # lp - lq
        kl_R[start:stop] = diff_RV.mul_(lp_RV.exp_()).nan_to_num_(nan=0.0).sum(-1)
    return kl_R.reshape(student_logits_NTV.shape[:-1])


def _chunk_advantage(s_rows, t_rows, tau, teacher_tau, weight_mode):
    """(A [R, V], p [R, V]) for one chunk: A = w * (lq - lp) with vocabulary-normalised weights."""
    lp_RV = _chunk_logprobs(s_rows, tau)
    lq_RV = _chunk_logprobs(t_rows, teacher_tau)
    p_RV = lp_RV.exp()
    q_RV = lq_RV.exp() if weight_mode == "teacher_p" else None
    log_ratio_RV = lq_RV.sub_(lp_RV)
    del lp_RV
    if weight_mode == "student_p":
        adv_RV = log_ratio_RV.mul_(p_RV)
    elif weight_mode == "teacher_p":
        adv_RV = log_ratio_RV.mul_(q_RV)
    else:  # none: uniform 1 / V
        adv_RV = log_ratio_RV.div_(s_rows.shape[-1])
    return adv_RV, p_RV


class _FullVocabPG(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_NTV, teacher_NTV, tau, teacher_tau, weight_mode, chunk_size):  # type: ignore[override]
        s_chunks, t_chunks = RowChunks(student_NTV, chunk_size), RowChunks(teacher_NTV, chunk_size)
        loss_R = torch.empty(s_chunks.n_rows, dtype=torch.float32, device=student_NTV.device)
        for start, stop in s_chunks.ranges():
            adv_RV, _ = _chunk_advantage(
                s_chunks.rows(start, stop), t_chunks.rows(start, stop), tau, teacher_tau, weight_mode
            )
            loss_R[start:stop] = -adv_RV.sum(-1)
        # References only: no copies. The teacher logits stay alive until backward (A is recomputed from them).
        ctx.save_for_backward(student_NTV, teacher_NTV)
        ctx.args = (tau, teacher_tau, weight_mode, chunk_size)
        return loss_R

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_R):  # type: ignore[override]
        student_NTV, teacher_NTV = ctx.saved_tensors
        tau, teacher_tau, weight_mode, chunk_size = ctx.args
        s_chunks, t_chunks = RowChunks(student_NTV, chunk_size), RowChunks(teacher_NTV, chunk_size)
        grad_student_NTV = torch.empty(student_NTV.shape, dtype=student_NTV.dtype, device=student_NTV.device)
        grad_RV = grad_student_NTV.view(-1, s_chunks.vocab)
        grad_R = grad_R.to(torch.float32)
        for start, stop in s_chunks.ranges():
            adv_RV, p_RV = _chunk_advantage(
                s_chunks.rows(start, stop), t_chunks.rows(start, stop), tau, teacher_tau, weight_mode
            )
            # dL/dx = -(A - p * sum A) / tau, times the incoming gradient of each row
            g_RV = p_RV.mul_(adv_RV.sum(-1, keepdim=True)).sub_(adv_RV)
            g_RV.mul_((grad_R[start:stop] / tau)[:, None])
            grad_RV[start:stop] = g_RV
        return grad_student_NTV, None, None, None, None, None


def full_vocab_pg_loss_NT(
    student_logits_NTV: torch.Tensor,
    teacher_logits_NTV: torch.Tensor,
    weight_mode: str = "student_p",
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-position surrogate L_t = -sum_v A_t(v), float32 [N, T], with grad = -sum_v sg(A_t(v)) grad lp_t(v).

    Differentiable w.r.t. the student logits only (the teacher is a constant). Aggregate over positions (mask,
    token-mean, ...) as for any other per-token loss. Extra memory: O(chunk_size * V) float32 scratch plus the
    gradient itself (in the student logits' dtype); the teacher logits are referenced until backward.
    """
    _check_settings(weight_mode, temperature, teacher_temperature)
    _check_pair(student_logits_NTV, teacher_logits_NTV)
    loss_R = _FullVocabPG.apply(
        student_logits_NTV,
        teacher_logits_NTV.detach(),
        float(temperature),
        float(teacher_temperature),
        weight_mode,
        int(chunk_size),
    )
    return loss_R.reshape(student_logits_NTV.shape[:-1])


# --- from final hidden states: the [T, V] logits never exist ------------------------------------------------------


# Rows of the hidden-state kernel per chunk: `hidden_chunk_rows` (chunk_size, at most 16-64 MiB of logits per
# buffer by the head's size, opd.core.logits); a chunk holds about four such buffers. At V = 151,936, H = 1,024
# that is 110 rows: peak ~1/20 of the naive path (bench/bench_rewards.py), where 256 rows would need ~600 MiB.
# Fewer rows cost speed (each chunk's rank-R update of the output embedding's gradient streams the whole [V, H]
# matrix).


class _FullVocabPGFromHidden(torch.autograd.Function):
    """sum_r weight_r * L_r with L_r = -sum_v A_r(v), from hidden states; gradients are computed in forward.

    Aggregation weights come in (the aggregation is linear), so the loss is a scalar and each chunk's
    d loss / d logits is consumed at once by the two matmuls of the head's backward: no [R, V] tensor survives a
    chunk, and the logits are built once per chunk (twice would double the head's matmuls).
    """

    @staticmethod
    def forward(ctx, h_RH, w_VH, b_V, th_RH, tw_VH, tb_V, weights_R, tau, teacher_tau, weight_mode, chunk_size, kl_R):  # type: ignore[override]
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(h_RH) if want_h else None
        grad_w = torch.zeros_like(w_VH) if want_w else None
        acc = torch.promote_types(w_VH.dtype, torch.float32)  # float32, or float64 for float64 heads
        grad_b = torch.zeros(w_VH.shape[0], dtype=acc, device=w_VH.device) if want_b else None
        loss = torch.zeros((), dtype=acc, device=h_RH.device)
        weights_R = weights_R.to(acc)
        vocab = w_VH.shape[0]
        for start in range(0, h_RH.shape[0], chunk_size):
            stop = min(start + chunk_size, h_RH.shape[0])
            h_c = h_RH[start:stop]
            lp = _head_chunk(h_c, w_VH, b_V, tau)
            lp.sub_(torch.logsumexp(lp, -1, keepdim=True))
            adv = _head_chunk(th_RH[start:stop], tw_VH, tb_V, teacher_tau)
            adv.sub_(torch.logsumexp(adv, -1, keepdim=True))  # lq
            q = adv.exp() if weight_mode == "teacher_p" else None
            adv.sub_(lp)  # lq - lp
            p = lp.exp_()  # lp is not needed any more: p takes its buffer
            if kl_R is not None and weight_mode != "student_p":  # KL_r = -sum_v p (lq - lp), no [R, V] temporary
                kl_R[start:stop] = -(p[:, None, :] @ adv[:, :, None]).reshape(-1)
            if weight_mode == "student_p":
                adv.mul_(p)
            elif weight_mode == "teacher_p":
                adv.mul_(q)
                del q
            else:  # none: uniform 1 / V
                adv.div_(vocab)
            sum_adv = adv.sum(-1, keepdim=True)
            if kl_R is not None and weight_mode == "student_p":  # the loss term itself is KL_r
                kl_R[start:stop] = -sum_adv[:, 0]
            w_c = weights_R[start:stop, None]
            loss -= (sum_adv * w_c).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            # dL/dx = -(A - p * sum A) / tau per row, times the row's aggregation weight
            g = p.mul_(sum_adv).sub_(adv).mul_(w_c / tau)
            del adv
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(w_VH.dtype)
            if grad_h is not None:
                grad_h[start:stop] = g @ w_VH
            if grad_w is not None:
                grad_w.addmm_(g.T, h_c)
        ctx.grads = (grad_h, grad_w, None if grad_b is None else grad_b.to(b_V.dtype))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        scale = None if bool(grad_out == 1) else grad_out

        def scaled(g):
            return None if g is None else (g if scale is None else g * scale.to(g.dtype))

        grads = tuple(scaled(g) for g in ctx.grads)
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None, None, None)


def full_vocab_pg_loss_from_hidden(
    student: OutputHead,
    teacher: OutputHead,
    weights_NT: torch.Tensor,
    weight_mode: str = "student_p",
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kl_out_NT: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_t weights_t * L_t with the `full_vocab_pg_loss_NT` surrogate L_t, from both models' final hidden states.

    Equal in value and gradient (w.r.t. the student's hidden states, output weight and bias) to running the
    student's head, `full_vocab_pg_loss_NT` and a linear aggregation with weights `weights_NT` (`agg_weights`), but
    only chunk_size rows (at most `hidden_chunk_rows`) of either model's logits exist at a time, and backward
    allocates nothing [T, V]-sized.
    Positions of weight 0 (padding) are skipped. Teacher tensors are constants. Not twice differentiable.
    `kl_out_NT`, when given (float32 [N, T]), receives the exact reverse KL_t at the positions of nonzero weight
    (`full_vocab_reverse_kl`'s value, for the diagnostics) at no extra pass.
    """
    _check_settings(weight_mode, temperature, teacher_temperature)
    s_h, t_h = student.hidden_NTH, teacher.hidden_NTH
    if s_h.shape[:-1] != t_h.shape[:-1] or weights_NT.shape != s_h.shape[:-1]:
        raise ValueError(
            f"student hidden {tuple(s_h.shape)}, teacher hidden {tuple(t_h.shape)} and weights "
            f"{tuple(weights_NT.shape)} must share their leading [N, T] dims"
        )
    if student.weight_VH.shape[0] != teacher.weight_VH.shape[0]:
        raise ValueError(
            f"student head has {student.weight_VH.shape[0]} rows and teacher head {teacher.weight_VH.shape[0]}; "
            "teacher and student must share the vocabulary"
        )
    keep = weights_NT != 0
    rows = hidden_chunk_rows(chunk_size, *student.weight_VH.shape)
    kl_R = None if kl_out_NT is None else torch.zeros(int(keep.sum()), dtype=torch.float64, device=s_h.device)
    loss = _FullVocabPGFromHidden.apply(
        s_h[keep],
        student.weight_VH,
        student.bias_V,
        t_h[keep].detach(),
        teacher.weight_VH.detach(),
        None if teacher.bias_V is None else teacher.bias_V.detach(),
        weights_NT[keep].detach(),
        float(temperature),
        float(teacher_temperature),
        weight_mode,
        rows,
        kl_R,
    )
    if kl_out_NT is not None:
        kl_out_NT[keep] = kl_R.to(kl_out_NT.dtype)
    return loss
