"""Memory-bounded reads of a model's next-token distribution from its raw logits.

Why this module exists: a [N, T, V] logits tensor at V = 151,936 is already gigabytes in bf16; the textbook
`log_softmax(logits.float())` doubles that again in float32 and keeps it alive for backward. Everything OPD needs
from a distribution at a position is small: the log-normaliser (one number per row), a few log-probs (top-k, the
sampled token, the other model's top-k) and the entropy. So we walk the rows (positions) in chunks, upcast one
chunk at a time to float32, compute the logsumexp once per row, and read what is needed from that chunk.

Peak extra memory of every function here is O(chunk_size * V) float32 (a few such buffers), independent of N*T.
Logits may be bf16, fp16 or fp32; results are float32. `_NTV` inputs may have any number of leading dims (outputs
keep them) and may be strided views such as the response slice `logits[:, prompt_len - 1:-1]`: rows are read
chunk by chunk through views (`RowChunks`), never by flattening, which would copy the whole slice.
`head_logit_stats` reads the same from a model's final hidden states and output embedding: each chunk's logits
are built by the head's matmul and dropped after use, so the [N, T, V] logits never exist at all.
"""

from __future__ import annotations

import torch

from opd.core.types import LogitStats, OutputHead

# Rows (positions) per chunk in the logits kernels. At V = 151,936 a 256-row float32 chunk is ~150 MB, so the
# chunked paths peak at 1/16-1/64 of a naive full log-softmax (bench/bench_rewards.py); tiny vocabularies pay only
# a few more loop iterations.
DEFAULT_CHUNK_SIZE = 256

# Logits per chunk built from hidden states: rows = chunk_size, but at most about a quarter of the output
# embedding's own size [V, H] per float32 buffer (a chunk holds about three such buffers), and between 2^22 and
# 2^24 logits (16-64 MiB). Each chunk streams the whole [V, H] embedding (its logits' matmul and, in the update,
# its gradient's rank-R update), so fewer rows cost bandwidth and skinnier matmuls: at H = 1,024 (Qwen3-0.6B),
# 64 rows ran 2.9x slower than 110 (bench/bench_rewards.py), so big heads get 2^24 (110 rows at V = 151,936); at
# H = 64 (the toy models) 2^22 (27 rows) measured as fast as 110 rows at a quarter of the memory.
HIDDEN_CHUNK_ELEMENTS_MIN = 1 << 22
HIDDEN_CHUNK_ELEMENTS = 1 << 24


def hidden_chunk_rows(chunk_size: int, vocab: int, hidden: int) -> int:
    """Rows per chunk of the hidden-state kernels: `chunk_size`, capped as the comment above says."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not valid; expected >= 1")
    budget = min(HIDDEN_CHUNK_ELEMENTS, max(HIDDEN_CHUNK_ELEMENTS_MIN, vocab * hidden // 4))
    return max(1, min(int(chunk_size), budget // max(vocab, 1)))


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is not valid; expected > 0")


def _check_ids(ids_NTJ: torch.Tensor, logits_NTV: torch.Tensor, name: str = "ids_NTJ") -> None:
    """Shape and range check up front: an out-of-range gather is a device assert on GPU, unreadable."""
    _check_ids_for(ids_NTJ, tuple(logits_NTV.shape), name)


def _check_ids_for(ids_NTJ: torch.Tensor, logits_shape: tuple, name: str = "ids_NTJ") -> None:
    """`_check_ids` against the shape [..., V] of logits that may never be built (the hidden-state reads)."""
    if ids_NTJ.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (long), got {ids_NTJ.dtype}")
    if ids_NTJ.dim() != len(logits_shape) or tuple(ids_NTJ.shape[:-1]) != tuple(logits_shape[:-1]):
        raise ValueError(
            f"{name} has shape {tuple(ids_NTJ.shape)}; expected leading dims {tuple(logits_shape[:-1])} "
            f"of the logits {tuple(logits_shape)} plus one trailing id dim"
        )
    if ids_NTJ.numel():
        lo, hi = int(ids_NTJ.min()), int(ids_NTJ.max())
        vocab = logits_shape[-1]
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} holds ids in [{lo}, {hi}]; expected ids in [0, {vocab - 1}] (vocab size {vocab})")


def _float_chunk(rows_RV: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh float32 copy of a chunk of rows divided by the temperature (never aliases the caller's logits)."""
    x_RV = rows_RV.to(torch.float32, copy=True)
    if temperature != 1.0:
        x_RV.div_(temperature)
    return x_RV


class RowChunks:
    """Consecutive flat row ranges [start, stop) of a [..., V] tensor, each as a [R, V] tensor, never a full copy.

    A tensor that flattens to [rows, V] as a view is simply sliced. A strided one, typically the response slice
    `logits[:, prompt_len - 1:-1]` of a model's output, cannot be flattened without copying all of it; its chunks
    are assembled from per-sequence views instead (at most a chunk-sized copy when a chunk spans two sequences).
    Row ranges depend only on the shape, so two same-shaped tensors chunk identically whatever their strides.
    """

    def __init__(self, x: torch.Tensor, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} is not valid; expected >= 1")
        if x.dim() < 2:
            raise ValueError(f"logits must have shape [..., V] with at least one position dim, got {tuple(x.shape)}")
        self.vocab = x.shape[-1]
        self.n_rows = x[..., 0].numel()
        self.chunk_size = chunk_size
        try:
            self._flat = x.view(-1, self.vocab)
            self._seq = None
        except RuntimeError:
            self._flat = None
            self._seq = x.reshape(-1, x.shape[-2], self.vocab)  # a view for the usual [N, T, V] slice

    def ranges(self):
        for start in range(0, self.n_rows, self.chunk_size):
            yield start, min(start + self.chunk_size, self.n_rows)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self._flat is not None:
            return self._flat[start:stop]
        T = self._seq.shape[1]
        seqs = range(start // T, (stop - 1) // T + 1)
        pieces = [self._seq[n, max(start - n * T, 0) : min(stop - n * T, T)] for n in seqs]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


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
    chunks = RowChunks(logits_NTV, chunk_size)
    return _stats(
        tuple(logits_NTV.shape),
        chunks.ranges(),
        lambda start, stop: _float_chunk(chunks.rows(start, stop), temperature),
        k=k,
        ids_NTJ=ids_NTJ,
        device=logits_NTV.device,
    )


def _head_chunk(h_RH: torch.Tensor, w_VH: torch.Tensor, b_V: torch.Tensor | None, tau: float) -> torch.Tensor:
    """One chunk of logits / tau, at least float32; the matmul runs in the head's dtype, as the model's lm_head
    does, so the values are those of the model's own (upcast) logits."""
    x = torch.nn.functional.linear(h_RH, w_VH, b_V)
    x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    return x.div_(tau) if tau != 1.0 else x


@torch.no_grad()
def head_logit_stats(
    hidden_NTH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    *,
    k: int,
    ids_NTJ: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> LogitStats:
    """`logit_stats` of the logits `hidden @ weight.T + bias`, which are never built whole: each chunk of rows
    (`hidden_chunk_rows`: a few MiB of logits) comes from the head's matmul and is read and dropped at once.
    Peak extra memory: about 3 chunks of float32 logits, whatever N * T is."""
    _check_temperature(temperature)
    lead, vocab = tuple(hidden_NTH.shape[:-1]), weight_VH.shape[0]
    h_RH = hidden_NTH.reshape(-1, hidden_NTH.shape[-1])
    rows = hidden_chunk_rows(chunk_size, vocab, weight_VH.shape[1])
    ranges = ((start, min(start + rows, h_RH.shape[0])) for start in range(0, h_RH.shape[0], rows))
    return _stats(
        (*lead, vocab),
        ranges,
        lambda start, stop: _head_chunk(h_RH[start:stop], weight_VH, bias_V, temperature),
        k=k,
        ids_NTJ=ids_NTJ,
        device=hidden_NTH.device,
    )


def _stats(logits_shape: tuple, ranges, chunk_at, *, k: int, ids_NTJ, device) -> LogitStats:
    """The reads of `logit_stats` over row ranges; `chunk_at(start, stop)` gives a fresh float32 [R, V] chunk of
    logits / temperature that this function may overwrite."""
    lead, vocab = logits_shape[:-1], logits_shape[-1]
    if not 0 <= k <= vocab:
        raise ValueError(f"k={k!r} is not valid; expected 0 <= k <= vocab size {vocab}")
    if ids_NTJ is not None:
        _check_ids_for(ids_NTJ, logits_shape)
    n_rows = 1
    for d in lead:
        n_rows *= d
    topk_ids_RK = torch.empty(n_rows, k, dtype=torch.long, device=device) if k else None
    topk_lp_RK = torch.empty(n_rows, k, dtype=torch.float32, device=device) if k else None
    ids_RJ = ids_NTJ.reshape(n_rows, ids_NTJ.shape[-1]).long() if ids_NTJ is not None else None
    lp_at_RJ = torch.empty(ids_RJ.shape, dtype=torch.float32, device=device) if ids_RJ is not None else None
    entropy_R = torch.empty(n_rows, dtype=torch.float32, device=device)

    for start, stop in ranges:
        x_RV = chunk_at(start, stop)
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


def _logprobs_at_grad_(
    x_RV: torch.Tensor, lse_R: torch.Tensor, ids_RJ: torch.Tensor, g_RJ: torch.Tensor, tau: float
) -> torch.Tensor:
    """d (sum_j g[r, j] lp[r, ids[r, j]]) / d logits for one chunk, given x = logits / tau and the saved normaliser:
    (scatter of g at the ids - softmax(x) * sum_j g) / tau, built in `x_RV`'s buffer (its values are consumed)."""
    g_RV = x_RV.sub_(lse_R[:, None]).exp_().mul_(-g_RJ.sum(-1, keepdim=True))
    g_RV.scatter_add_(-1, ids_RJ, g_RJ)
    return g_RV.div_(tau) if tau != 1.0 else g_RV


class _LogprobsAt(torch.autograd.Function):
    """lp[r, j] = x[r, ids[r, j]] / tau - logsumexp(x[r] / tau), with a chunked backward.

    Forward keeps only the per-row log-normaliser (float32 [R]) besides a reference to the logits the caller
    already holds. Backward rebuilds the softmax one chunk at a time:
        d lp[r, j] / d x[r, u] = (1[u == ids[r, j]] - softmax(x[r] / tau)[u]) / tau,
    so the gradient flows through the whole softmax, as if log_softmax had been materialised.
    """

    @staticmethod
    def forward(ctx, logits_NTV, ids_RJ, temperature, chunk_size):  # type: ignore[override]
        chunks = RowChunks(logits_NTV, chunk_size)
        lp_RJ = torch.empty(ids_RJ.shape, dtype=torch.float32, device=logits_NTV.device)
        lse_R = torch.empty(chunks.n_rows, dtype=torch.float32, device=logits_NTV.device)
        for start, stop in chunks.ranges():
            x_RV = _float_chunk(chunks.rows(start, stop), temperature)
            lse_R[start:stop] = torch.logsumexp(x_RV, dim=-1)
            lp_RJ[start:stop] = x_RV.gather(-1, ids_RJ[start:stop]) - lse_R[start:stop, None]
        ctx.save_for_backward(logits_NTV, ids_RJ, lse_R)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return lp_RJ

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_RJ):  # type: ignore[override]
        logits_NTV, ids_RJ, lse_R = ctx.saved_tensors
        tau = ctx.temperature
        chunks = RowChunks(logits_NTV, ctx.chunk_size)
        grad_logits_NTV = torch.empty(logits_NTV.shape, dtype=logits_NTV.dtype, device=logits_NTV.device)
        grad_RV = grad_logits_NTV.view(-1, chunks.vocab)
        grad_RJ = grad_RJ.to(torch.float32)
        for start, stop in chunks.ranges():
            x_RV = _float_chunk(chunks.rows(start, stop), tau)
            grad_RV[start:stop] = _logprobs_at_grad_(
                x_RV, lse_R[start:stop], ids_RJ[start:stop], grad_RJ[start:stop], tau
            )
        return grad_logits_NTV, None, None, None


class _LogprobsAtHead(torch.autograd.Function):
    """`_LogprobsAt` from final hidden states: each chunk's logits come from the head's matmul, in forward and again
    in backward (one more matmul than from logits), so no [R, V] tensor is kept or returned: backward turns each
    chunk's d lp / d logits into the hidden states' and the output embedding's gradients at once. Rows whose
    incoming gradient is all zero (padding, masked slots) are skipped in backward."""

    @staticmethod
    def forward(ctx, h_RH, w_VH, b_V, ids_RJ, temperature, rows):  # type: ignore[override]
        lp_RJ = torch.empty(ids_RJ.shape, dtype=torch.float32, device=h_RH.device)
        acc = torch.promote_types(w_VH.dtype, torch.float32)  # the chunks' dtype: float32, or float64 heads'
        lse_R = torch.empty(h_RH.shape[0], dtype=acc, device=h_RH.device)
        for start in range(0, h_RH.shape[0], rows):
            stop = min(start + rows, h_RH.shape[0])
            x_RV = _head_chunk(h_RH[start:stop], w_VH, b_V, temperature)
            lse_R[start:stop] = torch.logsumexp(x_RV, dim=-1)
            lp_RJ[start:stop] = x_RV.gather(-1, ids_RJ[start:stop]) - lse_R[start:stop, None]
        ctx.save_for_backward(h_RH, w_VH, b_V, ids_RJ, lse_R)
        ctx.temperature, ctx.rows = temperature, rows
        return lp_RJ

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_RJ):  # type: ignore[override]
        h_RH, w_VH, b_V, ids_RJ, lse_R = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        tau = ctx.temperature
        grad_h = torch.zeros_like(h_RH) if want_h else None
        grad_w = torch.zeros_like(w_VH) if want_w else None
        acc = torch.promote_types(w_VH.dtype, torch.float32)  # the chunks' dtype: float32, or float64 heads'
        grad_b = torch.zeros(w_VH.shape[0], dtype=acc, device=w_VH.device) if want_b else None
        live = (grad_RJ != 0).any(-1).nonzero()[:, 0]  # rows that receive any gradient
        h_live, ids_live, lse_live = h_RH[live], ids_RJ[live], lse_R[live]
        g_live = grad_RJ[live].to(acc)
        for start in range(0, live.shape[0], ctx.rows):
            stop = min(start + ctx.rows, live.shape[0])
            h_c = h_live[start:stop]
            x_RV = _head_chunk(h_c, w_VH, b_V, tau)
            g_RV = _logprobs_at_grad_(x_RV, lse_live[start:stop], ids_live[start:stop], g_live[start:stop], tau)
            if grad_b is not None:
                grad_b += g_RV.sum(0)
            g_RV = g_RV.to(w_VH.dtype)
            if grad_h is not None:
                grad_h[live[start:stop]] = g_RV @ w_VH
            if grad_w is not None:
                grad_w.addmm_(g_RV.T, h_c)
        return grad_h, grad_w, None if grad_b is None else grad_b.to(b_V.dtype), None, None, None


def logprobs_at(
    logits_NTV: torch.Tensor | OutputHead,
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
    Given an `OutputHead` instead of logits, the same values with gradients w.r.t. its hidden states, weight and
    bias, and no [N, T, V] tensor at all (not even the gradient): chunks of `hidden_chunk_rows` rows.
    """
    _check_temperature(temperature)
    if isinstance(logits_NTV, OutputHead):
        head = logits_NTV
        lead, (vocab, hidden) = tuple(head.hidden_NTH.shape[:-1]), head.weight_VH.shape
        _check_ids_for(ids_NTJ, (*lead, vocab))
        lp_RJ = _LogprobsAtHead.apply(
            head.hidden_NTH.reshape(-1, hidden),
            head.weight_VH,
            head.bias_V,
            ids_NTJ.reshape(-1, ids_NTJ.shape[-1]).long(),
            float(temperature),
            hidden_chunk_rows(chunk_size, vocab, hidden),
        )
        return lp_RJ.reshape(ids_NTJ.shape)
    _check_ids(ids_NTJ, logits_NTV)
    ids_RJ = ids_NTJ.reshape(-1, ids_NTJ.shape[-1]).long()
    lp_RJ = _LogprobsAt.apply(logits_NTV, ids_RJ, float(temperature), int(chunk_size))
    return lp_RJ.reshape(ids_NTJ.shape)
