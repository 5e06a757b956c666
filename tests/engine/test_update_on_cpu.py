"""The optimiser side of the update: LR schedules, skipping non-finite steps, the KL-to-reference term."""

from __future__ import annotations

import math

import pytest
import torch

from opd.engines.local import trainer
from opd.engines.local.logging import read_metrics
from opd.engines.local.update import optimizer_step
from opd.optim import make_optimizer, make_scheduler


def _lrs(kind: str, total: int, warmup_ratio: float) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, lr=1.0, betas=(0.9, 0.999), weight_decay=0.0)
    sched = make_scheduler(opt, kind=kind, total_steps=total, warmup_ratio=warmup_ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_and_cosine_with_warmup():
    assert _lrs("constant", 5, 0.03) == [1.0] * 5
    lrs = _lrs("cosine", 100, 0.03)
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # 3% of 100 steps of linear warmup
    # opd.optim's convention: the decay starts at the peak and reaches 0 just after the last step (never at lr 0)
    expected = [0.5 * (1 + math.cos(math.pi * (s - 3) / 97)) for s in range(3, 100)]
    assert lrs[3:] == pytest.approx(expected)
    assert lrs[3] == 1.0 and 0 < lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_non_finite_gradient_skips_the_step():
    model = torch.nn.Linear(3, 1)
    opt = make_optimizer(model, lr=0.1, betas=(0.9, 0.999), weight_decay=0.01)
    sched = make_scheduler(opt, kind="constant", total_steps=2, warmup_ratio=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    out = optimizer_step(model, opt, sched, grad_clip=1.0)
    assert out["actor/skipped_step"] == 1.0 and not math.isfinite(out["actor/grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model(torch.ones(1, 3)).sum().backward()
    out = optimizer_step(model, opt, sched, grad_clip=1.0)
    assert out["actor/skipped_step"] == 0.0 and out["actor/grad_norm"] == pytest.approx(math.sqrt(4.0))
    assert not torch.equal(before[0], model.weight)


@pytest.mark.parametrize("top_k", [4, 0])
def test_kl_to_reference_starts_at_zero_then_grows(tiny_cfg, top_k):
    run = trainer.train(tiny_cfg(total_steps=3, lr=1e-2, **{"algo.use_kl": True, "algo.top_k": top_k}))
    rows = [r for r in read_metrics(run) if r["step"] > 0]
    assert rows[0]["actor/kl_loss"] == 0.0  # the reference is the initial student
    assert rows[1]["actor/kl_loss"] > 0.0 and rows[2]["actor/kl_loss"] > 0.0
