"""Memory-bounded reads of a model's next-token distribution from its raw logits.

Why this module exists: a [N, T, V] logits tensor at V = 151,936 is already gigabytes in bf16; the textbook
`log_softmax(logits.float())` doubles that again in float32 and keeps it alive for backward. Everything OPD needs
from a distribution at a position is small: the log-normaliser (one number per row), a few log-probs (top-k, the
sampled token, the other model's top-k) and the entropy. So we walk the rows (positions) in chunks, upcast one
chunk at a time to float32, compute the logsumexp once per row, and read what is needed from that chunk.

Peak extra memory of every function here is O(chunk_size * V) float32 (a few such buffers), independent of N*T.
Logits may be bf16, fp16 or fp32; results are float32. Leading dimensions are flattened: `_NTV` inputs may in fact
have any number of leading dims, and outputs keep them.
"""

from __future__ import annotations

import torch

from opd.core.types import LogitStats

DEFAULT_CHUNK_SIZE = 1024


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is not valid; expected > 0")


def _check_ids(ids_NTJ: torch.Tensor, logits_NTV: torch.Tensor, name: str = "ids_NTJ") -> None:
    """Shape and range check up front: an out-of-range gather is a device assert on GPU, unreadable."""
    if ids_NTJ.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (long), got {ids_NTJ.dtype}")
    if ids_NTJ.dim() != logits_NTV.dim() or ids_NTJ.shape[:-1] != logits_NTV.shape[:-1]:
        raise ValueError(
            f"{name} has shape {tuple(ids_NTJ.shape)}; expected leading dims {tuple(logits_NTV.shape[:-1])} "
            f"of the logits {tuple(logits_NTV.shape)} plus one trailing id dim"
        )
    if ids_NTJ.numel():
        lo, hi = int(ids_NTJ.min()), int(ids_NTJ.max())
        vocab = logits_NTV.shape[-1]
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} holds ids in [{lo}, {hi}]; expected ids in [0, {vocab - 1}] (vocab size {vocab})")


def _float_chunk(rows_RV: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh float32 copy of a chunk of rows divided by the temperature (never aliases the caller's logits)."""
    x_RV = rows_RV.to(torch.float32, copy=True)
    if temperature != 1.0:
        x_RV.div_(temperature)
    return x_RV


def _entropy_of_logprobs_(lp_RV: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row; consumes `lp_RV` as scratch. 0 * log 0 (masked -inf logits) counts as 0."""
    p_RV = lp_RV.exp()
    return -p_RV.mul_(lp_RV).nan_to_num_(nan=0.0).sum(-1)


@torch.no_grad()
def logit_stats(
    logits_NTV: torch.Tensor,
    *,
    k: int,
    ids_NTJ: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> LogitStats:
    """One chunked no-grad pass: top-k ids and log-probs, log-probs at `ids_NTJ`, and the entropy.

    Log-probs are of softmax(logits / temperature) over the full vocabulary. Ties in the top-k are broken by
    torch.topk (deterministic for a given input and device). k = 0 skips the top-k (fields are None).
    Shapes: logits [N, T, V]; ids [N, T, J]; returns topk_ids/topk_lp [N, T, k], lp_at_ids [N, T, J], entropy [N, T].
    Peak extra memory: about 2 * chunk_size * V float32.
    """
    _check_temperature(temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not valid; expected >= 1")
    lead, vocab = logits_NTV.shape[:-1], logits_NTV.shape[-1]
    if not 0 <= k <= vocab:
        raise ValueError(f"k={k!r} is not valid; expected 0 <= k <= vocab size {vocab}")
    if ids_NTJ is not None:
        _check_ids(ids_NTJ, logits_NTV)

    rows_RV = logits_NTV.reshape(-1, vocab)
    n_rows = rows_RV.shape[0]
    device = logits_NTV.device
    topk_ids_RK = torch.empty(n_rows, k, dtype=torch.long, device=device) if k else None
    topk_lp_RK = torch.empty(n_rows, k, dtype=torch.float32, device=device) if k else None
    ids_RJ = ids_NTJ.reshape(n_rows, -1).long() if ids_NTJ is not None else None
    lp_at_RJ = torch.empty(ids_RJ.shape, dtype=torch.float32, device=device) if ids_RJ is not None else None
    entropy_R = torch.empty(n_rows, dtype=torch.float32, device=device)

    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        x_RV = _float_chunk(rows_RV[start:stop], temperature)
        lse_R1 = torch.logsumexp(x_RV, dim=-1, keepdim=True)
        if k:
            vals, idx = torch.topk(x_RV, k, dim=-1)
            topk_ids_RK[start:stop] = idx
            topk_lp_RK[start:stop] = vals - lse_R1
        if ids_RJ is not None:
            lp_at_RJ[start:stop] = x_RV.gather(-1, ids_RJ[start:stop]) - lse_R1
        entropy_R[start:stop] = _entropy_of_logprobs_(x_RV.sub_(lse_R1))

    def shaped(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(*lead, t.shape[-1])

    return LogitStats(
        topk_ids_NTK=shaped(topk_ids_RK),
        topk_lp_NTK=shaped(topk_lp_RK),
        lp_at_ids_NTJ=shaped(lp_at_RJ),
        entropy_NT=entropy_R.reshape(lead),
    )


class _LogprobsAt(torch.autograd.Function):
    """lp[r, j] = x[r, ids[r, j]] / tau - logsumexp(x[r] / tau), with a chunked backward.

    Forward keeps only the per-row log-normaliser (float32 [R]) besides a reference to the logits the caller
    already holds. Backward rebuilds the softmax one chunk at a time:
        d lp[r, j] / d x[r, u] = (1[u == ids[r, j]] - softmax(x[r] / tau)[u]) / tau,
    so the gradient flows through the whole softmax, as if log_softmax had been materialised.
    """

    @staticmethod
    def forward(ctx, logits_RV, ids_RJ, temperature, chunk_size):  # type: ignore[override]
        n_rows = logits_RV.shape[0]
        lp_RJ = torch.empty(ids_RJ.shape, dtype=torch.float32, device=logits_RV.device)
        lse_R = torch.empty(n_rows, dtype=torch.float32, device=logits_RV.device)
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            x_RV = _float_chunk(logits_RV[start:stop], temperature)
            lse_R[start:stop] = torch.logsumexp(x_RV, dim=-1)
            lp_RJ[start:stop] = x_RV.gather(-1, ids_RJ[start:stop]) - lse_R[start:stop, None]
        ctx.save_for_backward(logits_RV, ids_RJ, lse_R)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return lp_RJ

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_RJ):  # type: ignore[override]
        logits_RV, ids_RJ, lse_R = ctx.saved_tensors
        tau, chunk_size = ctx.temperature, ctx.chunk_size
        grad_logits_RV = torch.empty_like(logits_RV)
        grad_RJ = grad_RJ.to(torch.float32)
        for start in range(0, logits_RV.shape[0], chunk_size):
            stop = min(start + chunk_size, logits_RV.shape[0])
            g_RJ = grad_RJ[start:stop]
            # softmax rebuilt in place from the saved normaliser, then -softmax * sum_j g + scatter of g at the ids.
            p_RV = _float_chunk(logits_RV[start:stop], tau).sub_(lse_R[start:stop, None]).exp_()
            g_RV = p_RV.mul_(-g_RJ.sum(-1, keepdim=True))
            g_RV.scatter_add_(-1, ids_RJ[start:stop], g_RJ)
            if tau != 1.0:
                g_RV.div_(tau)
            grad_logits_RV[start:stop] = g_RV
        return grad_logits_RV, None, None, None


def logprobs_at(
    logits_NTV: torch.Tensor,
    ids_NTJ: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Full-vocabulary log-probs at given ids, differentiable w.r.t. the logits: [N, T, V], [N, T, J] -> [N, T, J].

    Used in the update (the student re-run with gradient). Equivalent to
    `log_softmax(logits.float() / temperature).gather(-1, ids)` in value and gradient, but no float32 [N, T, V]
    tensor is created in forward, and backward allocates only the gradient itself (in the logits' dtype) plus
    O(chunk_size * V) float32 scratch. Also fine under torch.no_grad(). Not twice differentiable.
    """
    _check_temperature(temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not valid; expected >= 1")
    _check_ids(ids_NTJ, logits_NTV)
    vocab = logits_NTV.shape[-1]
    rows_RV = logits_NTV.reshape(-1, vocab)
    ids_RJ = ids_NTJ.reshape(rows_RV.shape[0], -1).long()
    lp_RJ = _LogprobsAt.apply(rows_RV, ids_RJ, float(temperature), int(chunk_size))
    return lp_RJ.reshape(ids_NTJ.shape)
