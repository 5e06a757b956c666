"""Full-vocabulary reverse KL and its policy-gradient loss term vs float64 brute force and torch.nn.functional."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opd.core.config import OPDConfig
from opd.core.full_vocab import full_vocab_pg_loss_NT, full_vocab_reverse_kl
from opd.core.rewards import compute_rewards
from opd.core.support import build_support


def pair(seed: int, shape, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0
    t = s + torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("V", [2, 17, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temps", [(1.0, 1.0), (0.7, 1.3)])
def test_reverse_kl_matches_float64(V, dtype, temps):
    s, t = pair(V, (3, 5, V), dtype)
    tau, tau_t = temps
    kl = full_vocab_reverse_kl(s, t, temperature=tau, teacher_temperature=tau_t, chunk_size=4)
    lp = torch.log_softmax(s.double() / tau, -1)
    lq = torch.log_softmax(t.double() / tau_t, -1)
    ref = (lp.exp() * (lp - lq)).sum(-1)
    assert kl.shape == (3, 5) and kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), ref, atol=2e-5, rtol=1e-4)
    assert ref.max() > 1e-2  # the reference is not trivially 0


def test_reverse_kl_equals_kl_div_and_is_zero_for_identical():
    s, t = pair(1, (2, 4, 11))
    ref = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(full_vocab_reverse_kl(s, t, chunk_size=3), ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(full_vocab_reverse_kl(s, s.clone()), torch.zeros(2, 4))


def test_reverse_kl_chunked_equals_unchunked_and_zero_prob_terms():
    s, t = pair(2, (3, 7, 40), torch.bfloat16)
    whole = full_vocab_reverse_kl(s, t, chunk_size=10_000)
    for chunk in (1, 4, 21):
        torch.testing.assert_close(full_vocab_reverse_kl(s, t, chunk_size=chunk), whole, atol=1e-6, rtol=0)
    s32 = s.float()
    s32[0, 0, :5] = float("-inf")  # p = 0 there: those terms contribute 0, not NaN
    kl = full_vocab_reverse_kl(s32, t.float())
    lp = torch.log_softmax(s32.double(), -1)
    lq = torch.log_softmax(t.double(), -1)
    ref = torch.where(lp.exp() > 0, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1)
    torch.testing.assert_close(kl.double(), ref, atol=2e-5, rtol=1e-5)


def ref_pg(s64, t64, mode, tau, tau_t, upstream):
    """Brute force: value -sum_v A, gradient of -sum_v sg(A) lp, all float64 over the materialised vocabulary."""
    x = s64.clone().requires_grad_(True)
    lp = torch.log_softmax(x / tau, -1)
    lq = torch.log_softmax(t64 / tau_t, -1)
    w = {"student_p": lp.exp(), "teacher_p": lq.exp(), "none": torch.full_like(lp, 1.0 / lp.shape[-1])}[mode]
    adv = (w * (lq - lp)).detach()
    (-(adv * lp).sum(-1) * upstream).sum().backward()
    return -adv.sum(-1), x.grad


@pytest.mark.parametrize("mode", ["student_p", "teacher_p", "none"])
@pytest.mark.parametrize("V", [5, 64])
@pytest.mark.parametrize("temps", [(1.0, 1.0), (0.6, 1.4)])
def test_pg_loss_value_and_gradient_match_float64(mode, V, temps):
    s, t = pair(10 + V, (2, 6, V))
    tau, tau_t = temps
    upstream = torch.randn(2, 6, generator=torch.Generator().manual_seed(V), dtype=torch.float64)
    x = s.clone().requires_grad_(True)
    teacher = t.clone().requires_grad_(True)
    loss = full_vocab_pg_loss_NT(x, teacher, mode, temperature=tau, teacher_temperature=tau_t, chunk_size=5)
    (loss.double() * upstream).sum().backward()
    ref_value, ref_grad = ref_pg(s.double(), t.double(), mode, tau, tau_t, upstream)
    torch.testing.assert_close(loss.double(), ref_value, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=2e-6, rtol=1e-4)
    assert teacher.grad is None  # the teacher is a constant
    assert ref_grad.abs().max() > 1e-3


def test_pg_loss_student_p_is_the_exact_reverse_kl_and_its_gradient():
    """With student_p the surrogate equals KL_t, and -sum sg(A) grad lp is the true gradient of KL_t."""
    s, t = pair(3, (2, 5, 33))
    x = s.clone().requires_grad_(True)
    loss = full_vocab_pg_loss_NT(x, t, "student_p", temperature=0.9, chunk_size=4)
    loss.sum().backward()
    torch.testing.assert_close(loss, full_vocab_reverse_kl(s, t, temperature=0.9), atol=1e-6, rtol=1e-5)
    x64 = s.double().requires_grad_(True)
    lp = torch.log_softmax(x64 / 0.9, -1)
    lq = torch.log_softmax(t.double(), -1)
    (lp.exp() * (lp - lq)).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-6, rtol=1e-4)


def test_pg_loss_zero_for_identical_and_chunk_invariant_bf16():
    s, t = pair(4, (2, 9, 50), torch.bfloat16)
    x = s.clone().requires_grad_(True)
    loss = full_vocab_pg_loss_NT(x, s.clone(), "teacher_p")
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(2, 9)) and torch.equal(x.grad, torch.zeros_like(x.grad))
    grads = []
    for chunk in (1, 7, 1000):
        x = s.clone().requires_grad_(True)
        loss = full_vocab_pg_loss_NT(x, t, "student_p", chunk_size=chunk)
        loss.sum().backward()
        assert x.grad.dtype == torch.bfloat16
        grads.append((loss.detach(), x.grad))
    for loss, grad in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, grads[0][1], atol=0, rtol=0)


def test_full_vocab_equals_topk_with_k_equal_v():
    """only_stu with K = V and student_p covers the whole vocabulary: its rewards sum to -L_t of the full path."""
    s, t = pair(5, (2, 3, 9))
    lp, lq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    S, T = lp.topk(9, -1).indices, lq.topk(9, -1).indices
    sup = build_support(
        "only_stu",
        student_topk_ids_NTK=S,
        teacher_topk_ids_NTK=T,
        student_lp_at_student_NTK=lp.gather(-1, S),
        teacher_lp_at_student_NTK=lq.gather(-1, S),
    )
    for mode in ("student_p", "teacher_p", "none"):
        rewards = compute_rewards(OPDConfig(top_k=9, reward_weight_mode=mode), sup)
        torch.testing.assert_close(-rewards.sum(-1), full_vocab_pg_loss_NT(s, t, mode), atol=1e-6, rtol=1e-5)


def test_pg_loss_keeps_no_float32_vocab_tensor_for_backward():
    N, T, V = 2, 8, 64
    s = torch.randn(N, T, V, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(N, T, V, dtype=torch.bfloat16)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = full_vocab_pg_loss_NT(s, t, chunk_size=4)
    assert not [x for x in saved if x.dtype == torch.float32 and x.numel() >= N * T * V // 4]
    loss.sum().backward()


def test_bad_input_is_named():
    s = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="weight_mode='p'"):
        full_vocab_pg_loss_NT(s, s, "p")
    with pytest.raises(ValueError, match="share the vocabulary"):
        full_vocab_reverse_kl(s, torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="teacher_temperature|temperature"):
        full_vocab_reverse_kl(s, s, teacher_temperature=0.0)


def test_strided_response_slices_match_contiguous():
    s, t = pair(6, (3, 11, 19))
    s_full = s.clone().requires_grad_(True)
    kl = full_vocab_reverse_kl(s_full[:, 2:-1], t[:, 1:-2], chunk_size=4)
    torch.testing.assert_close(
        kl, full_vocab_reverse_kl(s[:, 2:-1].contiguous(), t[:, 1:-2].contiguous()), atol=1e-6, rtol=0
    )
    loss = full_vocab_pg_loss_NT(s_full[:, 2:-1], t[:, 1:-2], "teacher_p", chunk_size=4)
    (loss * torch.arange(loss.numel()).reshape(loss.shape)).sum().backward()
    x = s[:, 2:-1].contiguous().requires_grad_(True)
    ref = full_vocab_pg_loss_NT(x, t[:, 1:-2].contiguous(), "teacher_p")
    (ref * torch.arange(ref.numel()).reshape(ref.shape)).sum().backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_full.grad[:, 2:-1], x.grad, atol=1e-6, rtol=1e-6)
    assert (s_full.grad[:, :2] == 0).all()
