"""The update's loss: a per-slot policy surrogate summed over support slots, token aggregation, and the optional
KL-to-reference term, as plain tensor functions every engine calls.

Policy losses are registered in `POLICY_LOSSES` and chosen by `OPDConfig.policy_loss` (POLICY_LOSS):
- `ppo` (default): the dual-clip PPO surrogate -min(r A, clip(r) A), floored at -clip_ratio_c * A for A < 0;
- `importance_sampling`: -r A with no clipping (Tinker's default loss for on-policy distillation).
On-policy (one optimiser step per rollout batch, r = 1) both have the same gradient -A grad lp; they differ only
when the ratio moves away from 1. A registered loss has the signature
`fn(log_prob, old_log_prob, advantages, cfg) -> (elementwise loss, {"ratio", "clipped", "dual_clipped"})`.

Why the slot dimension is kept: the top-k OPD signal is sum_c A_t(c) grad lp_t(v_c). Collapsing the K advantages
into one scalar on the sampled token has zero expected gradient, so `log_prob`, `old_log_prob` and `advantages`
are [N, T, C] (top-k) or [N, T] (sampled token / GRPO) and the surrogate is summed over slots *before* the
token aggregation. On-policy (old == new) the gradient is exactly -sum_c A_t(c) grad lp_t(v_c), aggregated.

Aggregation (`agg_loss`, shared by the policy and KL terms). With m the response mask and v the per-position value:
- token-mean: sum v m / sum m (over the whole batch);
- seq-mean-token-sum: mean over sequences of sum_t v m;
- seq-mean-token-mean: mean over sequences of (sum_t v m / sum_t m);
- seq-mean-token-sum-norm: mean over sequences of sum_t v m / L, with L = `norm_length` (pass the configured
  maximum response length; the default is the padded width T, which makes the scale depend on the batch's padding).
"Sequences" are those with at least one unmasked position, so responses masked out entirely (format mask) do not
dilute the mean. For gradient accumulation pass `BatchTotals` with the whole mini-batch's counts: the sum of the
micro-batch losses then equals the loss of the full batch.

KL to the reference (`kl_to_reference`, elementwise on any shape). In the top-k path (`kl_loss` with [N, T, C]
inputs) the per-slot estimates are averaged over the valid slots with stop-gradient weights p(v_c) renormalised
over the support: the exact expectation, restricted to the support, of what the sampled-token estimator estimates
from one draw. In the 2-D path it is the usual estimate at the sampled token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from opd.core.registry import Registry

if TYPE_CHECKING:
    from opd.core.config import OPDConfig

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_LOSS_TYPES = ("low_var_kl", "k1", "k2")

LOG_RATIO_CLAMP = 20.0  # |lp - old_lp| is clamped before exp so a stale sample cannot overflow the ratio
LOW_VAR_KL_CLAMP = 10.0  # the low-variance KL estimate is clamped to [-10, 10] (it explodes when ref >> p)


@dataclass(frozen=True)
class BatchTotals:
    """What a micro-batch's loss is normalised by; None: the micro-batch's own counts (or T for norm_length)."""

    norm_length: float | None = None  # L of seq-mean-token-sum-norm: the configured maximum response length
    total_tokens: float | None = None  # valid tokens of the whole mini-batch (token-mean)
    total_seqs: float | None = None  # sequences with a valid token in the whole mini-batch (seq-mean-*)


def agg_loss(
    values_NT: torch.Tensor, mask_NT: torch.Tensor, mode: str, totals: BatchTotals | None = None
) -> torch.Tensor:
    """Aggregate per-position loss values into a scalar (see module docstring for each mode)."""
    totals = totals or BatchTotals()
    norm_length, total_tokens, total_seqs = totals.norm_length, totals.total_tokens, totals.total_seqs
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={mode!r} is not valid; allowed: {', '.join(LOSS_AGG_MODES)}")
    if values_NT.shape != mask_NT.shape or values_NT.dim() != 2:
        raise ValueError(
            "agg_loss needs [N, T] values and a mask of the same shape; "
            f"got {tuple(values_NT.shape)} and {tuple(mask_NT.shape)}"
        )
    m = mask_NT.to(values_NT.dtype)
    # torch.where, not v * m: a masked position holding inf/nan must not poison the sum (or its gradient)
    vm = torch.where(m > 0, values_NT, torch.zeros_like(values_NT)) * m
    if mode == "token-mean":
        denom = m.sum() if total_tokens is None else torch.as_tensor(total_tokens, dtype=m.dtype, device=m.device)
        return vm.sum() / denom.clamp(min=1)
    tokens_N = m.sum(-1)
    seq_sum_N = vm.sum(-1)
    if total_seqs is None:
        n_seqs = (tokens_N > 0).sum().to(m.dtype)
    else:
        n_seqs = torch.as_tensor(total_seqs, dtype=m.dtype, device=m.device)
    if mode == "seq-mean-token-sum":
        per_seq = seq_sum_N
    elif mode == "seq-mean-token-mean":
        per_seq = seq_sum_N / tokens_N.clamp(min=1)
    else:  # seq-mean-token-sum-norm
        L = float(values_NT.shape[-1] if norm_length is None else norm_length)
        if not L > 0:
            raise ValueError(f"norm_length={norm_length!r} is not valid; expected > 0")
        per_seq = seq_sum_N / L
    return per_seq.sum() / n_seqs.clamp(min=1)


def agg_weights(
    mask_NT: torch.Tensor, mode: str, totals: BatchTotals | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-position weights w, [N, T] of `dtype`, with agg_loss(v, mask, mode, totals) == (w * v).sum() for finite v.

    Every aggregation mode is linear in the per-position values, so a fused loss can take these weights and
    return the aggregated scalar directly (the full-vocabulary loss from hidden states does)."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={mode!r} is not valid; allowed: {', '.join(LOSS_AGG_MODES)}")
    totals = totals or BatchTotals()
    m = (mask_NT > 0).to(dtype)
    if mode == "token-mean":
        denom = float(m.sum()) if totals.total_tokens is None else float(totals.total_tokens)
        return m / max(denom, 1.0)
    tokens_N = m.sum(-1, keepdim=True)
    n_seqs = float((tokens_N > 0).sum()) if totals.total_seqs is None else float(totals.total_seqs)
    if mode == "seq-mean-token-sum":
        per_seq = torch.ones_like(tokens_N)
    elif mode == "seq-mean-token-mean":
        per_seq = 1.0 / tokens_N.clamp(min=1)
    else:  # seq-mean-token-sum-norm
        L = float(m.shape[-1] if totals.norm_length is None else totals.norm_length)
        if not L > 0:
            raise ValueError(f"norm_length={totals.norm_length!r} is not valid; expected > 0")
        per_seq = torch.full_like(tokens_N, 1.0 / L)
    return m * per_seq / max(n_seqs, 1.0)


def _check_shapes(log_prob, old_log_prob, advantages, response_mask_NT, slot_valid_NTC) -> None:
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(
            "log-prob, old/reference log-prob and advantages must have one shape; got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    if log_prob.dim() not in (2, 3) or log_prob.shape[:2] != response_mask_NT.shape:
        raise ValueError(
            f"log_prob must be [N, T] or [N, T, C] matching response_mask_NT {tuple(response_mask_NT.shape)}; "
            f"got {tuple(log_prob.shape)}"
        )
    if slot_valid_NTC is not None and slot_valid_NTC.shape != log_prob.shape:
        raise ValueError(f"slot_valid_NTC {tuple(slot_valid_NTC.shape)} must match log_prob {tuple(log_prob.shape)}")


def _valid_elements(log_prob, response_mask_NT, slot_valid_NTC) -> torch.Tensor:
    """Bool mask of the elements (positions or slots) that count."""
    valid = response_mask_NT.bool()
    if log_prob.dim() == 3:
        valid = valid.unsqueeze(-1).expand_as(log_prob)
        if slot_valid_NTC is not None:
            valid = valid & slot_valid_NTC.bool()
    return valid


def _zero_invalid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


SurrogateFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: Registry[SurrogateFn] = Registry("policy loss")


def _ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    return torch.exp((log_prob - old_log_prob.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


@POLICY_LOSSES.register("ppo")
def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, cfg: OPDConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Elementwise dual-clip PPO loss -min(r A, clip(r) A), floored at -clip_ratio_c * A when A < 0.

    Returns the loss (same shape) and elementwise tensors for metrics: ratio, clipped (the clipped branch was
    active), dual_clipped (the dual-clip floor was active)."""
    adv = advantages.detach()
    ratio = _ratio(log_prob, old_log_prob)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = torch.minimum(loss_ppo, -adv * cfg.clip_ratio_c)
    loss = torch.where(adv < 0, loss_dual, loss_ppo)
    info = {
        "ratio": ratio.detach(),
        "clipped": (loss_clipped > loss_unclipped).detach(),
        "dual_clipped": ((adv < 0) & (loss_ppo > -adv * cfg.clip_ratio_c)).detach(),
    }
    return loss, info


@POLICY_LOSSES.register("importance_sampling")
def importance_sampling(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, cfg: OPDConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Elementwise -r A, no clipping: the plain importance-weighted policy gradient."""
    ratio = _ratio(log_prob, old_log_prob)
    never = torch.zeros_like(ratio, dtype=torch.bool)
    return -advantages.detach() * ratio, {"ratio": ratio.detach(), "clipped": never, "dual_clipped": never.clone()}


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask_NT: torch.Tensor,
    slot_valid_NTC: torch.Tensor | None,
    cfg: OPDConfig,
    totals: BatchTotals | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-slot surrogate (`cfg.policy_loss`), summed over slots, aggregated by `cfg.loss_agg_mode`.

    `log_prob` carries the gradient (gathered from a full-vocabulary log-softmax); `old_log_prob` and `advantages`
    are constants. Invalid slots and masked positions contribute exactly 0. Metrics are over counted elements."""
    _check_shapes(log_prob, old_log_prob, advantages, response_mask_NT, slot_valid_NTC)
    valid = _valid_elements(log_prob, response_mask_NT, slot_valid_NTC)
    # zero the inputs, not only the output: an inf/nan at an invalid slot would otherwise reach the gradient (0 * nan)
    loss_el, info = POLICY_LOSSES.get(cfg.policy_loss)(
        _zero_invalid(log_prob, valid), _zero_invalid(old_log_prob, valid), _zero_invalid(advantages, valid), cfg
    )
    loss_el = _zero_invalid(loss_el, valid)
    loss_NT = loss_el.sum(-1) if loss_el.dim() == 3 else loss_el
    loss = agg_loss(loss_NT, response_mask_NT, cfg.loss_agg_mode, totals)
    return loss, _surrogate_metrics(loss, info, log_prob, old_log_prob, valid)


def _surrogate_metrics(loss, info, log_prob, old_log_prob, valid) -> dict[str, float]:
    """Means / extrema over the counted elements (masked reductions: boolean indexing costs a sync and a copy)."""
    n = valid.sum()
    if n == 0:
        return {"actor/pg_loss": float(loss.detach())}
    zero = torch.zeros((), dtype=info["ratio"].dtype, device=valid.device)
    mean = lambda x: float(torch.where(valid, x.to(zero.dtype), zero).sum() / n)  # noqa: E731
    ratio = info["ratio"]
    inf = torch.full((), float("inf"), dtype=ratio.dtype, device=ratio.device)
    return {
        "actor/pg_loss": float(loss.detach()),
        "actor/pg_clipfrac": mean(info["clipped"]),
        "actor/pg_clipfrac_lower": mean(info["dual_clipped"]),
        "actor/ppo_kl": mean(old_log_prob.detach() - log_prob.detach()),
        "actor/ratio_mean": mean(ratio),
        "actor/ratio_min": float(torch.where(valid, ratio, inf).min()),
        "actor/ratio_max": float(torch.where(valid, ratio, -inf).max()),
    }


def kl_to_reference(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str) -> torch.Tensor:
    """Elementwise single-sample estimate of KL(pi || ref) at the given tokens (any shape).

    k1 = lp - lr; k2 = (lp - lr)^2 / 2; low_var_kl (k3) = r - log r - 1 with r = exp(lr - lp), clamped."""
    ref = ref_log_prob.detach()
    if kind == "k1":
        return log_prob - ref
    if kind == "k2":
        return 0.5 * (log_prob - ref) ** 2
    if kind == "low_var_kl":
        log_r = (ref - log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.exp(log_r) - log_r - 1).clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    raise ValueError(f"kl_loss_type={kind!r} is not valid; allowed: {', '.join(KL_LOSS_TYPES)}")


def kl_per_position(
    log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str, slot_valid_NTC: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, T] KL estimate: the elementwise estimate in the 2-D path; in the top-k path the average over valid slots
    weighted by stop-gradient p(v_c) renormalised over the support (a position with no valid slot gives 0)."""
    if log_prob.dim() == 2:
        return kl_to_reference(log_prob, ref_log_prob, kind)
    valid = torch.ones_like(log_prob, dtype=torch.bool) if slot_valid_NTC is None else slot_valid_NTC.bool()
    kl = kl_to_reference(_zero_invalid(log_prob, valid), _zero_invalid(ref_log_prob, valid), kind)
    w = _zero_invalid(log_prob.detach().exp(), valid)
    w = w / w.sum(-1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
    return (w * _zero_invalid(kl, valid)).sum(-1)


def kl_loss(
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask_NT: torch.Tensor,
    slot_valid_NTC: torch.Tensor | None,
    cfg: OPDConfig,
    totals: BatchTotals | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL-to-reference loss (un-weighted: the engine adds `cfg.kl_coef * loss`), in the 2-D or the top-k path."""
    _check_shapes(log_prob, ref_log_prob, ref_log_prob, response_mask_NT, slot_valid_NTC)
    # keep padding garbage (e.g. -inf at masked positions or invalid slots) out of the value and the gradient
    valid = _valid_elements(log_prob, response_mask_NT, slot_valid_NTC)
    if log_prob.dim() == 2:
        log_prob, ref_log_prob = _zero_invalid(log_prob, valid), _zero_invalid(ref_log_prob, valid)
    kl_NT = kl_per_position(log_prob, ref_log_prob, cfg.kl_loss_type, valid if log_prob.dim() == 3 else None)
    loss = agg_loss(kl_NT, response_mask_NT, cfg.loss_agg_mode, totals)
    return loss, {"actor/kl_loss": float(loss.detach()), "actor/kl_coef": cfg.kl_coef}


def apply_format_mask(response_mask_NT: torch.Tensor, has_box_N: torch.Tensor) -> torch.Tensor:
    """ENABLE_FORMAT_REWARD: zero the response mask of rollouts whose text has no \\boxed (found engine-side)."""
    if has_box_N.shape != response_mask_NT.shape[:1]:
        raise ValueError(f"has_box_N must be [N] with N = {response_mask_NT.shape[0]}; got {tuple(has_box_N.shape)}")
    return response_mask_NT * has_box_N.to(response_mask_NT.dtype).unsqueeze(-1)
