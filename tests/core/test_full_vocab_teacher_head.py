"""Full vocabulary from the student's logits and the teacher's output head, against float64 brute force."""

from __future__ import annotations

import pytest
import torch

from opd.core.full_vocab import OutputHead, full_vocab_pg_loss_NT, full_vocab_reverse_kl
from opd.core.full_vocab_teacher_head import full_vocab_pg_loss_at_rows, full_vocab_reverse_kl_at_rows

L, V, H = 11, 37, 8
ROWS = [1, 2, 4, 5, 6, 9, 10]  # a packed micro-batch's response rows (prompt rows 0, 3, 7, 8 unused)


def _inputs(seed: int, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, V, generator=g) * 3
    h = torch.randn(len(ROWS), H, generator=g)
    w = torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    return x, h, w, b


def _brute(x64, rows, h, w, b, mode, tau, teacher_tau):
    """Per-row surrogate value -sum_v A and a loss whose gradient is -sum_v sg(A) grad lp, in float64."""
    t_logits = h.double() @ w.double().T + (0 if b is None else b.double())
    lq = torch.log_softmax(t_logits / teacher_tau, -1)
    lp = torch.log_softmax(x64[rows] / tau, -1)
    p, q = lp.exp(), lq.exp()
    weight = {"student_p": p, "teacher_p": q, "none": torch.full_like(p, 1.0 / V)}[mode]
    adv = weight * (lq - lp)
    return -adv.sum(-1), -(adv.detach() * lp).sum(-1), (p * (lp - lq)).sum(-1)


@pytest.mark.parametrize("mode", ["student_p", "teacher_p", "none"])
@pytest.mark.parametrize("temps", [(1.0, 1.0), (0.7, 1.3)])
@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_value_and_gradient_equal_float64_brute_force(mode, temps, chunk):
    x, h, w, b = _inputs(0)
    rows = torch.tensor(ROWS)
    coef = torch.linspace(-1.0, 2.0, len(ROWS))  # an arbitrary upstream gradient per row
    xs = x.clone().requires_grad_(True)
    ours = full_vocab_pg_loss_at_rows(
        xs[None], rows, OutputHead(h, w, b), mode, temperature=temps[0], teacher_temperature=temps[1], chunk_size=chunk
    )
    (ours * coef).sum().backward()

    x64 = x.double().requires_grad_(True)
    value, surrogate, _ = _brute(x64, rows, h, w, b, mode, *temps)
    (surrogate * coef.double()).sum().backward()
    torch.testing.assert_close(ours.double(), value.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(xs.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)  # float32 kernel
    unused = [r for r in range(L) if r not in ROWS]
    assert float(xs.grad[unused].abs().max()) == 0.0 and float(xs.grad[ROWS].abs().max()) > 1e-3


def test_equals_the_logits_kernel_and_the_exact_kl():
    x, h, w, b = _inputs(1, bias=False)
    rows = torch.tensor(ROWS)
    t_logits = h @ w.T
    a = x.clone().requires_grad_(True)
    ours = full_vocab_pg_loss_at_rows(a, rows, OutputHead(h, w), "teacher_p", temperature=0.8, teacher_temperature=1.1)
    ours.sum().backward()
    s = x[rows].clone().requires_grad_(True)
    ref = full_vocab_pg_loss_NT(s[None], t_logits[None], "teacher_p", temperature=0.8, teacher_temperature=1.1)[0]
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.grad[rows], s.grad, atol=1e-7, rtol=1e-6)

    head = OutputHead(h, w)
    kl = full_vocab_reverse_kl_at_rows(x, rows, head, temperature=0.8, teacher_temperature=1.1, chunk_size=2)
    kl_ref = full_vocab_reverse_kl(x[rows][None], t_logits[None], temperature=0.8, teacher_temperature=1.1)[0]
    _, _, kl64 = _brute(x.double(), rows, h, w, None, "student_p", 0.8, 1.1)
    torch.testing.assert_close(kl, kl_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kl.double(), kl64, atol=2e-6, rtol=1e-5)
    assert float(kl.min()) > 0


def test_identical_models_give_zero_loss_and_gradient():
    _, h, w, b = _inputs(2)
    rows = torch.tensor(ROWS)
    x = torch.zeros(L, V)
    x[rows] = h @ w.T + b
    x.requires_grad_(True)
    loss = full_vocab_pg_loss_at_rows(x, rows, OutputHead(h, w, b))
    loss.sum().backward()
    assert float(loss.detach().abs().max()) < 1e-5 and float(x.grad.abs().max()) < 1e-6


def test_a_vocabulary_mismatch_is_one_line():
    x, h, w, b = _inputs(3)
    with pytest.raises(ValueError, match="must share the vocabulary"):
        full_vocab_pg_loss_at_rows(x[:, :-1], torch.tensor(ROWS), OutputHead(h, w, b))
    with pytest.raises(ValueError, match="weight_mode='bogus' is not valid"):
        full_vocab_pg_loss_at_rows(x, torch.tensor(ROWS), OutputHead(h, w, b), "bogus")
