"""The update: re-run the student with gradient, score it at the stored targets, one AdamW step.

One mini-batch, one epoch, one optimiser step per training step (on-policy, ratio = 1 up to float noise). Gradient
accumulation over micro-batches (token budget) passes the whole batch's token / sequence counts to the core's loss,
so the summed micro-batch losses equal the full-batch loss and micro-batching never changes the gradient.
The loss terms are the core's: `policy_loss` on the [N, T, C] targets (the K dimension is kept), the full-vocabulary
surrogate `full_vocab_pg_loss_NT` (which needs the teacher's logits again, so the teacher re-runs here, no grad),
and `kl_loss` to the frozen reference when USE_KL is on. A non-finite gradient norm skips the optimiser step.
"""

from __future__ import annotations

import math
import warnings

import torch

from opd.core.config import OPDConfig
from opd.core.full_vocab import full_vocab_pg_loss_NT
from opd.core.loss import agg_loss, kl_loss, policy_loss
from opd.engines.local.rollout import RolloutBatch, micro_batch_bounds
from opd.engines.local.scoring import Targets, response_logits, target_logprobs


def make_optimizer(model, *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas,
                             weight_decay=weight_decay)


def make_scheduler(optimizer, *, kind: str, total_steps: int, warmup_ratio: float):
    """constant, or cosine to 0 after a linear warmup of warmup_ratio * total_steps (at least 1 step)."""
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = max(1, int(round(warmup_ratio * total_steps)))

    def factor(step: int) -> float:  # `step` = optimiser steps already taken
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup + 1) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_and_backward(student, batch: RolloutBatch, targets: Targets, cfg: OPDConfig, *, token_budget: int,
                      norm_length: int, teacher=None, vocab_size: int | None = None) -> dict[str, float]:
    """Accumulate the gradient of the full-batch loss over micro-batches; returns loss metrics."""
    mask = targets.response_mask_NT
    totals = dict(norm_length=float(norm_length), total_tokens=float(mask.sum()),
                  total_seqs=float((mask.sum(-1) > 0).sum()))
    out: dict[str, float] = {"actor/loss": 0.0}
    weighted: dict[str, float] = {}
    for start, stop in micro_batch_bounds(batch, token_budget):
        mb = batch.rows(start, stop)
        tg = targets.rows(start, stop, mb.resp_width)
        n_valid = float(tg.response_mask_NT.sum())
        logits = response_logits(student, mb, vocab_size)
        loss = logits.new_zeros((), dtype=torch.float32)
        lp = None
        if tg.adv_NTC is not None or cfg.use_kl:
            lp = target_logprobs(logits, tg, cfg.temperature, cfg.chunk_size)
        if tg.adv_NTC is not None:
            pg, metrics = policy_loss(lp, tg.old_lp_NTC, tg.adv_NTC, tg.response_mask_NT, tg.valid_NTC, cfg, **totals)
            loss = loss + pg
            out["actor/pg_loss"] = out.get("actor/pg_loss", 0.0) + metrics.pop("actor/pg_loss")
            for key, value in metrics.items():
                weighted[key] = weighted.get(key, 0.0) + value * n_valid
        if tg.full_vocab:
            with torch.no_grad():
                t_logits = response_logits(teacher, mb, vocab_size)
            per_pos = full_vocab_pg_loss_NT(logits, t_logits, cfg.reward_weight_mode, temperature=cfg.temperature,
                                            teacher_temperature=cfg.teacher_temperature, chunk_size=cfg.chunk_size)
            fv = agg_loss(per_pos, tg.response_mask_NT, cfg.loss_agg_mode, **totals)
            loss = loss + fv
            out["actor/full_vocab_loss"] = out.get("actor/full_vocab_loss", 0.0) + float(fv.detach())
        if cfg.use_kl:
            kl, _ = kl_loss(lp, tg.ref_lp_NTC, tg.response_mask_NT, tg.valid_NTC, cfg, **totals)
            loss = loss + cfg.kl_coef * kl
            out["actor/kl_loss"] = out.get("actor/kl_loss", 0.0) + float(kl.detach())
        loss.backward()
        out["actor/loss"] += float(loss.detach())
    n_total = max(1.0, totals["total_tokens"])
    out.update({key: value / n_total for key, value in weighted.items()})
    return out


def optimizer_step(model, optimizer, scheduler, *, grad_clip: float) -> dict[str, float]:
    """Clip, step (unless the gradient norm is not finite), advance the schedule, clear gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    lr = optimizer.param_groups[0]["lr"]
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    with warnings.catch_warnings():  # a skipped step still advances the schedule (it counts training steps)
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"actor/grad_norm": grad_norm, "actor/lr": lr, "actor/skipped_step": float(skipped)}
