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

from opd.core.logits import DEFAULT_CHUNK_SIZE, RowChunks, _check_temperature, _float_chunk

# The weightings this kernel implements in closed form over the vocabulary (a weight mode registered by a plugin
# works on slot supports; over the full vocabulary it needs its own kernel here).
FULL_VOCAB_WEIGHT_MODES = ("student_p", "teacher_p", "none")


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
    if weight_mode not in FULL_VOCAB_WEIGHT_MODES:
        raise ValueError(
            f"weight_mode={weight_mode!r} is not valid for the full vocabulary; allowed: "
            f"{', '.join(FULL_VOCAB_WEIGHT_MODES)}"
        )
    _check_temperature(temperature)
    _check_temperature(teacher_temperature)
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
