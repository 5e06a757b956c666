"""The full-vocabulary loss from hidden states vs float64 brute force over materialised logits, and `agg_weights`."""

from __future__ import annotations

import pytest
import torch

from opd.core.full_vocab import OutputHead, full_vocab_pg_loss_from_hidden, full_vocab_pg_loss_NT
from opd.core.loss import LOSS_AGG_MODES, BatchTotals, agg_loss, agg_weights


def heads(seed: int, N=3, T=6, H=8, V=37, dtype=torch.float64, bias=True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    s = OutputHead(rnd(N, T, H), rnd(V, H, scale=0.7), rnd(V, scale=0.3) if bias else None)
    t = OutputHead(rnd(N, T, H), rnd(V, H, scale=0.9), rnd(V, scale=0.3) if bias else None)
    mask = torch.ones(N, T)
    mask[0, T // 2 :] = 0  # padding
    mask[-1, -1] = 0
    return s, t, mask


def with_grad(head: OutputHead) -> OutputHead:
    bias = None if head.bias_V is None else head.bias_V.clone().requires_grad_(True)
    return OutputHead(head.hidden_NTH.clone().requires_grad_(True), head.weight_VH.clone().requires_grad_(True), bias)


def logits(head: OutputHead) -> torch.Tensor:
    return torch.nn.functional.linear(head.hidden_NTH, head.weight_VH, head.bias_V)


def brute_force(s, t, mask, mode, tau, tau_t, agg, totals):
    """float64: the materialised logits, -sum_v sg(A) lp per position, then the aggregation; value and gradients."""
    s = with_grad(s)
    lp = torch.log_softmax(logits(s) / tau, -1)
    lq = torch.log_softmax(logits(t) / tau_t, -1)
    w = {"student_p": lp.exp(), "teacher_p": lq.exp(), "none": torch.full_like(lp, 1.0 / lp.shape[-1])}[mode]
    adv = (w * (lq - lp)).detach()
    surrogate = agg_loss(-(adv * lp).sum(-1), mask, agg, totals)
    surrogate.backward()
    value = agg_loss(-adv.sum(-1), mask, agg, totals)
    return value, s


@pytest.mark.parametrize("mode", ["student_p", "teacher_p", "none"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("temps", [(1.0, 1.0), (0.7, 1.3)])
def test_value_and_gradients_match_float64_brute_force(mode, agg, temps):
    s, t, mask = heads(hash((mode, agg, temps)) % 1000)
    totals = BatchTotals(norm_length=9.0, total_tokens=float(mask.sum()) + 3, total_seqs=4.0)
    tau, tau_t = temps
    ref_value, ref = brute_force(s, t, mask, mode, tau, tau_t, agg, totals)
    ours = with_grad(s)
    loss = full_vocab_pg_loss_from_hidden(
        ours, t, agg_weights(mask, agg, totals, dtype=torch.float64), mode, temperature=tau, teacher_temperature=tau_t,
        chunk_size=4,
    )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_value, atol=1e-9, rtol=1e-7)
    for name in ("hidden_NTH", "weight_VH", "bias_V"):
        got, want = getattr(ours, name).grad, getattr(ref, name).grad
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7, msg=name)
        assert want.abs().max() > 1e-4  # the reference gradient is not trivially 0
    assert ours.hidden_NTH.grad[mask == 0].abs().max() == 0  # padding gets no gradient


def test_equals_the_logits_path_in_float32_and_scales_with_the_upstream_gradient():
    s, t, mask = heads(7, N=2, T=9, H=16, V=300, dtype=torch.float32, bias=False)
    weights = agg_weights(mask, "token-mean")
    a = with_grad(s)
    per_pos = full_vocab_pg_loss_NT(logits(a), logits(t), "student_p", chunk_size=5)
    (3.0 * agg_loss(per_pos, mask, "token-mean")).backward()
    b = with_grad(s)
    (3.0 * full_vocab_pg_loss_from_hidden(b, t, weights, "student_p", chunk_size=5)).backward()
    torch.testing.assert_close(b.hidden_NTH.grad, a.hidden_NTH.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.weight_VH.grad, a.weight_VH.grad, atol=1e-6, rtol=1e-5)


def test_chunk_invariant_and_zero_for_identical_models():
    s, t, mask = heads(8, dtype=torch.float32)
    weights = agg_weights(mask, "seq-mean-token-mean")
    results = []
    for chunk in (1, 5, 1000):
        x = with_grad(s)
        loss = full_vocab_pg_loss_from_hidden(x, t, weights, "teacher_p", chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), x.hidden_NTH.grad, x.weight_VH.grad))
    for loss, gh, gw in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(gh, results[0][1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gw, results[0][2], atol=1e-6, rtol=1e-5)
    x = with_grad(s)
    same = OutputHead(s.hidden_NTH.clone(), s.weight_VH.clone(), s.bias_V.clone())
    loss = full_vocab_pg_loss_from_hidden(x, same, weights)
    loss.backward()
    assert abs(float(loss)) < 1e-6 and x.weight_VH.grad.abs().max() < 1e-6


def test_teacher_is_a_constant_and_bad_input_is_named():
    s, t, mask = heads(9, dtype=torch.float32)
    teacher = with_grad(t)
    x = with_grad(s)
    full_vocab_pg_loss_from_hidden(x, teacher, agg_weights(mask, "token-mean")).backward()
    assert teacher.hidden_NTH.grad is None and teacher.weight_VH.grad is None
    narrow = OutputHead(t.hidden_NTH, t.weight_VH[:-1], None)
    with pytest.raises(ValueError, match="share the vocabulary"):
        full_vocab_pg_loss_from_hidden(s, narrow, agg_weights(mask, "token-mean"))
    with pytest.raises(ValueError, match="weight_mode='p'"):
        full_vocab_pg_loss_from_hidden(s, t, agg_weights(mask, "token-mean"), "p")


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_agg_weights_reproduce_agg_loss(agg):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    mask = (torch.rand(4, 7, generator=gen) > 0.3).float()
    mask[2] = 0  # a sequence with no valid token
    for totals in (None, BatchTotals(norm_length=11.0, total_tokens=40.0, total_seqs=6.0)):
        want = agg_loss(values, mask.double(), agg, totals)
        got = (agg_weights(mask, agg, totals, dtype=torch.float64) * values).sum()
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["student_p", "teacher_p", "none"])
def test_kl_out_is_the_exact_reverse_kl_at_weighted_positions(mode):
    s, t, mask = heads(12, T=7, V=41)
    kl = torch.full(mask.shape, -1.0, dtype=torch.float64)
    full_vocab_pg_loss_from_hidden(
        with_grad(s), t, agg_weights(mask, "token-mean", dtype=torch.float64), mode, temperature=0.8,
        teacher_temperature=1.2, chunk_size=3, kl_out_NT=kl,
    )  # fmt: skip
    lp = torch.log_softmax(logits(s) / 0.8, -1)
    lq = torch.log_softmax(logits(t) / 1.2, -1)
    want = (lp.exp() * (lp - lq)).sum(-1)
    torch.testing.assert_close(kl[mask > 0], want[mask > 0], atol=1e-10, rtol=1e-9)
    assert (kl[mask == 0] == -1.0).all()  # padding untouched
    assert want.max() > 1e-2
