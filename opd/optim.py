"""The optimiser and learning-rate schedule of every OPD trainer (`opd train` and `opd sft`): one convention.

AdamW over the trainable parameters. `decay_1d_params=False` exempts 1-D parameters (biases, norm gains) from weight
decay, the usual transformer recipe that `opd sft` follows; `opd train` decays every parameter, as plain torch does
(kept so its runs and resumed checkpoints stay as they were). Each tool keeps its own defaults (betas, weight decay,
warmup ratio, min_lr_ratio) and passes them here.

Schedule `cosine` (`constant` is lr throughout), for step s = 0 .. total-1, counted as optimiser steps already taken:
  warmup = floor(warmup_ratio * total)  (a 1e-6 tolerance, so 0.29 * 100 gives 29, not 28)
  s < warmup:  lr * (s + 1) / warmup  (the first step never has lr 0)
  s >= warmup: lr * (m + (1 - m) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2),  m = min_lr_ratio
The first step after the warmup is at the peak again, and the floor is reached just after the last step. Until this
module, `opd train` used another convention (warmup max(1, round(r * total)), decay one step earlier) whose cosine
reached 0 on the last step: that step's rollout, scoring and backward were spent on a zero update. The convention
above is `opd sft`'s, so the embedded demo (SFT stages cosine with warmup 0.05, OPD stage constant) is unchanged;
floor rather than round is also `opd sft`'s and never warms up longer than asked.
"""

from __future__ import annotations

import math

import torch

__all__ = ["warmup_steps", "lr_factor", "make_optimizer", "make_scheduler", "clip_grad_norm"]


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Steps of linear warmup: floor(warmup_ratio * total_steps), robust to float error."""
    return int(math.floor(warmup_ratio * total_steps + 1e-6))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier of step `step` (0-based): linear warmup over `warmup` steps, then cosine from 1 to `min_ratio`
    at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(
    model, *, lr: float, betas: tuple[float, float], weight_decay: float, decay_1d_params: bool = True
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; with decay_1d_params=False, 1-D ones (biases, norms) get no decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    # All float32 on CPU: the foreach implementation (there a loop of the same per-tensor kernels, so the same bits as
    # torch's CPU default, the for-loop; tests/test_optim.py) with less dispatch. Not for bf16: its foreach scalar
    # multiply rounds the scalar to bf16 (other bits). Elsewhere torch's default (foreach on CUDA).
    foreach = True if params and all(p.is_cpu and p.dtype == torch.float32 for p in params) else None
    if decay_1d_params:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=foreach)


def make_scheduler(
    optimizer, *, kind: str, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """`constant`, or `cosine`: linear warmup then cosine to lr * min_lr_ratio (the convention in the module doc)."""
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if kind != "cosine":
        raise ValueError(f"unknown LR schedule {kind!r}; expected constant or cosine")
    warmup = warmup_steps(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, min_lr_ratio))


# Elements per float32 partial norm in `clip_grad_norm`: short enough that each partial sum keeps float32 accuracy.
NORM_CHUNK = 1 << 16


def _norm_squared(g: torch.Tensor) -> torch.Tensor:
    flat = g.detach().reshape(-1)
    whole = flat.numel() // NORM_CHUNK * NORM_CHUNK
    partial = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_CHUNK).float(), dim=1)
    rest = torch.linalg.vector_norm(flat[whole:].float())
    return partial.double().square().sum() + rest.double().square()


def clip_grad_norm(params, max_norm: float) -> float:
    """Total L2 norm of the gradients (reported as actor/grad_norm), then clipping to `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` does, with an accurate norm: torch's float32 CPU norm of one large tensor
    (a 150k-row output embedding) came out 1e-4 (relative) low. Partial norms over NORM_CHUNK elements are
    combined in float64; no float64 copy of a gradient is made. Returns inf / nan for non-finite gradients."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    with torch.no_grad():
        grads = [p.grad for p in params]
        device = grads[0].device
        # CPU gradients of at most one chunk: one float32 norm each, all from one `_foreach_norm` (on CPU a loop of the
        # same `linalg.vector_norm` calls, so the same bits) instead of ~12 Python-dispatched ops per parameter.
        small = [i for i, g in enumerate(grads) if g.is_cpu and g.numel() < NORM_CHUNK] if device.type == "cpu" else []
        if small:
            flat = [grads[i].reshape(-1) for i in small]
            flat = [f if f.dtype == torch.float32 else f.float() for f in flat]
            small_squares = torch.stack(torch._foreach_norm(flat)).double().square()
        if len(small) == len(grads):
            squares = small_squares
        else:  # float64 squares in parameter order, so the sum is the same as with one tensor at a time
            squares = torch.empty(len(grads), dtype=torch.float64, device=device)
            if small:
                squares[small] = small_squares
            for i in sorted(set(range(len(grads))) - set(small)):
                squares[i] = _norm_squared(grads[i])
        total = squares.sum().sqrt()
    if max_norm != float("inf"):
        # torch's coefficient, computed as torch does; at >= 1 its multiply by 1.0 would leave the gradients as they are
        if not float(float(max_norm) / (total + 1e-6)) >= 1.0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)
