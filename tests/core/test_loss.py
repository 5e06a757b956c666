"""The update's loss vs float64 brute-force loops: on-policy gradient = -sum_c A grad lp (analytic, tiny linear model),
clipping branches with off-policy ratios, each aggregation mode on ragged masks, KL-to-reference in both paths."""

from __future__ import annotations

import math

import pytest
import torch

from opd.core.config import OPDConfig
from opd.core.loss import (
    LOSS_AGG_MODES,
    BatchTotals,
    agg_loss,
    apply_format_mask,
    kl_loss,
    kl_per_position,
    kl_to_reference,
    policy_loss,
)

F64 = torch.float64


def ragged_mask(gen, N, T, empty_rows=()):
    lengths = torch.randint(1, T + 1, (N,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    for n in empty_rows:
        mask[n] = 0
    return mask


def agg_weights_loop(mask, mode, norm_length=None):
    """Brute-force per-position weights w[n][t] such that the aggregated loss is sum w * v."""
    N, T = mask.shape
    lens = [sum(mask[n, t].item() for t in range(T)) for n in range(N)]
    n_seqs = sum(1 for n in range(N) if lens[n] > 0)
    total = sum(lens)
    w = [[0.0] * T for _ in range(N)]
    for n in range(N):
        for t in range(T):
            if mask[n, t] == 0:
                continue
            if mode == "token-mean":
                w[n][t] = 1.0 / total
            elif mode == "seq-mean-token-sum":
                w[n][t] = 1.0 / n_seqs
            elif mode == "seq-mean-token-mean":
                w[n][t] = 1.0 / (lens[n] * n_seqs)
            else:
                w[n][t] = 1.0 / ((norm_length or T) * n_seqs)
    return w


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_matches_loop(mode):
    gen = torch.Generator().manual_seed(0)
    N, T = 6, 9
    mask = ragged_mask(gen, N, T, empty_rows=(2,))
    values = torch.randn(N, T, generator=gen, dtype=F64)
    values[mask == 0] = float("inf")  # padding garbage must not leak
    got = agg_loss(values, mask, mode, BatchTotals(norm_length=13))
    w = agg_weights_loop(mask, mode, norm_length=13)
    want = sum(w[n][t] * values[n, t].item() for n in range(N) for t in range(T) if mask[n, t] > 0)
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_micro_batches_with_global_counts_sum_to_full_batch(mode):
    gen = torch.Generator().manual_seed(1)
    N, T = 8, 7
    mask = ragged_mask(gen, N, T, empty_rows=(5,))
    values = torch.randn(N, T, generator=gen, dtype=F64)
    full = agg_loss(values, mask, mode, BatchTotals(norm_length=10))
    tokens, seqs = mask.sum().item(), (mask.sum(-1) > 0).sum().item()
    parts = [
        agg_loss(
            values[i : i + 3], mask[i : i + 3], mode, BatchTotals(norm_length=10, total_tokens=tokens, total_seqs=seqs)
        )
        for i in range(0, N, 3)
    ]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-12)


def test_agg_loss_rejects_unknown_mode_and_bad_shapes():
    with pytest.raises(ValueError, match="loss_agg_mode='mean'.*token-mean"):
        agg_loss(torch.zeros(2, 3), torch.ones(2, 3), "mean")
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        agg_loss(torch.zeros(2, 3, 1), torch.ones(2, 3), "token-mean")


def linear_model(gen, N, T, D, V):
    x = torch.randn(N, T, D, generator=gen, dtype=F64)
    W = torch.randn(D, V, generator=gen, dtype=F64).requires_grad_(True)
    return x, W


def analytic_pg_grad(x, W, ids, adv, valid, mask, mode):
    """-sum_{n,t,c} w_nt A_ntc d lp(v_c)/dW with d lp(v)/dW = x (e_v - softmax)^T, written with loops."""
    N, T, C = ids.shape
    V = W.shape[1]
    p = torch.softmax(x @ W.detach(), -1)
    w = agg_weights_loop(mask, mode)
    g = torch.zeros_like(W, dtype=F64)
    for n in range(N):
        for t in range(T):
            for c in range(C):
                if not valid[n, t, c] or w[n][t] == 0:
                    continue
                e = torch.zeros(V, dtype=F64)
                e[ids[n, t, c]] = 1.0
                g -= w[n][t] * adv[n, t, c].item() * torch.outer(x[n, t], e - p[n, t])
    return g


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("C", [1, 4])
def test_on_policy_gradient_equals_analytic_policy_gradient(mode, C):
    gen = torch.Generator().manual_seed(10 + C)
    N, T, D, V = 4, 5, 3, 11
    x, W = linear_model(gen, N, T, D, V)
    mask = ragged_mask(gen, N, T)
    ids = torch.randint(0, V, (N, T, C), generator=gen)
    valid = torch.rand(N, T, C, generator=gen) > 0.25
    valid[..., 0] = True
    adv = torch.randn(N, T, C, generator=gen, dtype=F64) * valid
    lp = torch.log_softmax(x @ W, -1).gather(-1, ids)
    loss, metrics = policy_loss(lp, lp.detach(), adv, mask, valid, OPDConfig(loss_agg_mode=mode))
    (grad,) = torch.autograd.grad(loss, W)
    want = analytic_pg_grad(x, W, ids, adv, valid, mask, mode)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    assert want.abs().max() > 1e-3  # non-zero signal, also at K = 1
    # on-policy: ratio 1, nothing clipped, loss value = -sum A aggregated
    assert metrics["actor/ratio_mean"] == pytest.approx(1.0) and metrics["actor/pg_clipfrac"] == 0.0
    w = agg_weights_loop(mask, mode)
    want_loss = -sum(w[n][t] * adv[n, t].sum().item() for n in range(N) for t in range(T))
    assert loss.item() == pytest.approx(want_loss, rel=1e-10)


def test_sampled_token_path_2d_gradient():
    gen = torch.Generator().manual_seed(20)
    N, T, D, V = 3, 6, 4, 9
    x, W = linear_model(gen, N, T, D, V)
    mask = ragged_mask(gen, N, T)
    ids = torch.randint(0, V, (N, T), generator=gen)
    adv = torch.randn(N, T, generator=gen, dtype=F64)
    lp = torch.log_softmax(x @ W, -1).gather(-1, ids[..., None]).squeeze(-1)
    loss, _ = policy_loss(lp, lp.detach(), adv, mask, None, OPDConfig(top_k=0))
    (grad,) = torch.autograd.grad(loss, W)
    all_valid = torch.ones(N, T, 1, dtype=torch.bool)
    want = analytic_pg_grad(x, W, ids[..., None], adv[..., None], all_valid, mask, "token-mean")
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


def surrogate_loop(lp, old, adv, cfg):
    """Per-element (loss, dloss/dlp, clipped, dual) from the PPO dual-clip definition, in python floats."""
    r = math.exp(lp - old)
    lo, hi = 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high
    rc = min(max(r, lo), hi)
    unclipped, clipped = -adv * r, -adv * rc
    if unclipped >= clipped:
        loss, grad, was_clipped = unclipped, -adv * r, False
    else:
        loss, grad, was_clipped = clipped, 0.0, True
    dual = False
    if adv < 0 and loss > -adv * cfg.clip_ratio_c:
        loss, grad, dual = -adv * cfg.clip_ratio_c, 0.0, True
    return loss, grad, was_clipped, dual


def test_off_policy_clipping_matches_loop():
    gen = torch.Generator().manual_seed(30)
    N, T, C = 5, 6, 4
    cfg = OPDConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode="seq-mean-token-mean")
    mask = ragged_mask(gen, N, T)
    valid = torch.rand(N, T, C, generator=gen) > 0.2
    old = torch.log(torch.rand(N, T, C, generator=gen, dtype=F64) * 0.9 + 0.05)
    lp = (old + (torch.rand(N, T, C, generator=gen, dtype=F64) * 3.0 - 1.5)).requires_grad_(True)  # ratios 0.22..4.5
    adv = torch.randn(N, T, C, generator=gen, dtype=F64)
    loss, metrics = policy_loss(lp, old, adv, mask, valid, cfg)
    (grad,) = torch.autograd.grad(loss, lp)
    w = agg_weights_loop(mask, cfg.loss_agg_mode)
    want_loss, n_el, n_clip, n_dual = 0.0, 0, 0, 0
    want_grad = torch.zeros_like(grad)
    for n in range(N):
        for t in range(T):
            for c in range(C):
                if not (valid[n, t, c] and mask[n, t] > 0):
                    continue
                i = (n, t, c)
                el, g, was_clipped, dual = surrogate_loop(lp[i].item(), old[i].item(), adv[i].item(), cfg)
                want_loss += w[n][t] * el
                want_grad[n, t, c] = w[n][t] * g
                n_el, n_clip, n_dual = n_el + 1, n_clip + was_clipped, n_dual + dual
    assert loss.item() == pytest.approx(want_loss, rel=1e-10)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)
    assert n_clip > 0 and n_dual > 0  # both branches really engaged by this input
    assert metrics["actor/pg_clipfrac"] == pytest.approx(n_clip / n_el)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(n_dual / n_el)


def test_invalid_slots_and_padding_contribute_nothing_even_with_garbage():
    gen = torch.Generator().manual_seed(40)
    N, T, C = 3, 4, 3
    mask = ragged_mask(gen, N, T)
    valid = torch.rand(N, T, C, generator=gen) > 0.4
    lp = torch.randn(N, T, C, generator=gen, dtype=F64).requires_grad_(True)
    old, adv = lp.detach() + 0.1, torch.randn(N, T, C, generator=gen, dtype=F64)
    bad = ~valid | (mask[..., None] == 0)
    lp_g = torch.where(bad, torch.full_like(lp, -float("inf")), lp)
    old_g = torch.where(bad, torch.full_like(old, float("nan")), old)
    adv_g = torch.where(bad, torch.full_like(adv, float("nan")), adv)
    loss_g, _ = policy_loss(lp_g, old_g, adv_g, mask, valid, OPDConfig())
    (grad_g,) = torch.autograd.grad(loss_g, lp)
    loss, _ = policy_loss(lp, old, torch.where(bad, torch.zeros_like(adv), adv), mask, valid, OPDConfig())
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss_g) and torch.isfinite(grad_g).all()
    assert loss_g.item() == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(grad_g, grad)
    assert torch.all(grad[bad] == 0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must have one shape"):
        policy_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.ones(2, 3), None, OPDConfig())
    with pytest.raises(ValueError, match="matching response_mask_NT"):
        policy_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 3), None, OPDConfig())


def kl_loop(lp, ref, kind):
    if kind == "k1":
        return lp - ref
    if kind == "k2":
        return 0.5 * (lp - ref) ** 2
    log_r = ref - lp
    return min(max(math.exp(log_r) - log_r - 1, -10.0), 10.0)


@pytest.mark.parametrize("kind", ["low_var_kl", "k1", "k2"])
def test_kl_to_reference_elementwise_and_zero_at_identity(kind):
    gen = torch.Generator().manual_seed(50)
    lp, ref = torch.randn(3, 4, 2, generator=gen, dtype=F64), torch.randn(3, 4, 2, generator=gen, dtype=F64)
    got = kl_to_reference(lp, ref, kind)
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in lp.shape)):
        i = tuple(idx.tolist())
        assert got[i].item() == pytest.approx(kl_loop(lp[i].item(), ref[i].item(), kind), rel=1e-12, abs=1e-14)
    assert torch.all(kl_to_reference(lp, lp, kind) == 0)
    with pytest.raises(ValueError, match="kl_loss_type='k3'"):
        kl_to_reference(lp, ref, "k3")


@pytest.mark.parametrize("kind", ["low_var_kl", "k1", "k2"])
@pytest.mark.parametrize("topk", [False, True])
def test_kl_loss_both_paths_value_and_gradient(kind, topk):
    gen = torch.Generator().manual_seed(60 + topk)
    N, T, C, D, V = 3, 5, 4, 3, 8
    x, W = linear_model(gen, N, T, D, V)
    ref_logits = torch.randn(N, T, V, generator=gen, dtype=F64)
    mask = ragged_mask(gen, N, T)
    ids = torch.randint(0, V, (N, T, C) if topk else (N, T, 1), generator=gen)
    valid = (torch.rand(N, T, C, generator=gen) > 0.3) if topk else None
    lp_full = torch.log_softmax(x @ W, -1)
    lp = lp_full.gather(-1, ids)
    ref = torch.log_softmax(ref_logits, -1).gather(-1, ids)
    if not topk:
        lp, ref = lp.squeeze(-1), ref.squeeze(-1)
    cfg = OPDConfig(use_kl=True, kl_loss_type=kind, loss_agg_mode="seq-mean-token-mean")
    loss, metrics = kl_loss(lp, ref, mask, valid, cfg)
    (grad,) = torch.autograd.grad(loss, W)
    # brute force: scalar built element by element (slot weights p / sum p over valid slots, stop-gradient)
    w = agg_weights_loop(mask, cfg.loss_agg_mode)
    W2 = W.detach().clone().requires_grad_(True)
    lp2_full = torch.log_softmax(x @ W2, -1)
    total = torch.zeros((), dtype=F64)
    for n in range(N):
        for t in range(T):
            if w[n][t] == 0:
                continue
            if not topk:
                v = int(ids[n, t, 0])
                log_p = lp2_full[n, t, v]
                r = torch.log_softmax(ref_logits[n, t], -1)[v]
                total = total + w[n][t] * kl_elem_torch(log_p, r, kind)
                continue
            slots = [c for c in range(C) if valid[n, t, c]]
            z = sum(lp_full[n, t, int(ids[n, t, c])].exp().item() for c in slots)
            for c in slots:
                v = int(ids[n, t, c])
                p = lp_full[n, t, v].exp().item()
                r = torch.log_softmax(ref_logits[n, t], -1)[v]
                total = total + w[n][t] * (p / z) * kl_elem_torch(lp2_full[n, t, v], r, kind)
    (want_grad,) = torch.autograd.grad(total, W2)
    assert loss.item() == pytest.approx(total.item(), rel=1e-10)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    assert want_grad.abs().max() > 1e-4
    assert metrics["actor/kl_loss"] == pytest.approx(total.item(), rel=1e-10)


def kl_elem_torch(log_p, log_r, kind):
    if kind == "k1":
        return log_p - log_r
    if kind == "k2":
        return 0.5 * (log_p - log_r) ** 2
    d = log_r - log_p
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)


def test_kl_topk_position_without_valid_slots_is_zero_and_finite():
    lp = torch.log(torch.tensor([[[0.5, 0.2], [0.3, 0.1]]], dtype=F64)).requires_grad_(True)
    ref = torch.log(torch.tensor([[[0.1, 0.6], [0.2, 0.2]]], dtype=F64))
    valid = torch.tensor([[[True, True], [False, False]]])
    kl_NT = kl_per_position(lp, ref, "k1", valid)
    assert kl_NT[0, 1].item() == 0.0
    p = torch.tensor([0.5, 0.2]) / 0.7
    want = float(p[0] * math.log(0.5 / 0.1) + p[1] * math.log(0.2 / 0.6))
    assert kl_NT[0, 0].item() == pytest.approx(want, rel=1e-6)
    loss, _ = kl_loss(lp, ref, torch.ones(1, 2), valid, OPDConfig(kl_loss_type="k1"))
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(g).all() and torch.all(g[0, 1] == 0)


def test_apply_format_mask():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    out = apply_format_mask(mask, torch.tensor([True, False, True]))
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="has_box_N must be"):
        apply_format_mask(mask, torch.tensor([True]))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batch_accumulation_gives_the_full_batch_gradient(mode):
    """Summed micro-batch losses (with the full batch's counts) == full-batch loss, gradient included."""
    gen = torch.Generator().manual_seed(70)
    N, T, C, D, V = 6, 5, 3, 3, 8
    x, W = linear_model(gen, N, T, D, V)
    mask = ragged_mask(gen, N, T, empty_rows=(4,))
    ids = torch.randint(0, V, (N, T, C), generator=gen)
    valid = torch.rand(N, T, C, generator=gen) > 0.3
    adv = torch.randn(N, T, C, generator=gen, dtype=F64)
    old = torch.log_softmax(x @ W.detach(), -1).gather(-1, ids) + 0.3 * torch.randn(N, T, C, generator=gen, dtype=F64)
    ref = torch.log_softmax(torch.randn(N, T, V, generator=gen, dtype=F64), -1).gather(-1, ids)
    cfg = OPDConfig(loss_agg_mode=mode, use_kl=True)
    totals = BatchTotals(norm_length=12.0, total_tokens=float(mask.sum()), total_seqs=float((mask.sum(-1) > 0).sum()))

    def loss_of(rows, totals):
        lp = torch.log_softmax(x[rows] @ W, -1).gather(-1, ids[rows])
        pg, _ = policy_loss(lp, old[rows], adv[rows], mask[rows], valid[rows], cfg, totals)
        kl, _ = kl_loss(lp, ref[rows], mask[rows], valid[rows], cfg, totals)
        return pg + cfg.kl_coef * kl

    full = loss_of(slice(0, N), BatchTotals(norm_length=12.0))
    (g_full,) = torch.autograd.grad(full, W)
    parts = [loss_of(slice(i, i + 1), totals) for i in range(N)]
    (g_parts,) = torch.autograd.grad(sum(parts), W)
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-10, atol=1e-13)


ON_DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]


@pytest.mark.parametrize("device", ON_DEVICES)
def test_losses_on_device_match_cpu(device):
    """No tensor silently created on the CPU (counts, clamps): the same numbers and gradients on `device`."""
    gen = torch.Generator().manual_seed(80)
    N, T, C = 4, 6, 3
    mask = ragged_mask(gen, N, T)
    lp = torch.randn(N, T, C, generator=gen, dtype=F64)
    old, ref = lp + 0.4 * torch.randn(N, T, C, generator=gen, dtype=F64), torch.randn(N, T, C, generator=gen, dtype=F64)
    adv, valid = torch.randn(N, T, C, generator=gen, dtype=F64), torch.rand(N, T, C, generator=gen) > 0.3
    cfg = OPDConfig(loss_agg_mode="seq-mean-token-sum-norm", use_kl=True)
    results = []
    for dev in ("cpu", device):
        x = lp.to(dev).requires_grad_(True)
        args = (mask.to(dev), valid.to(dev), cfg)
        pg, pg_metrics = policy_loss(x, old.to(dev), adv.to(dev), *args, BatchTotals(total_tokens=30.0, total_seqs=4.0))
        kl, _ = kl_loss(x, ref.to(dev), *args, BatchTotals(norm_length=9.0))
        (g,) = torch.autograd.grad(pg + kl, x)
        results.append((pg.item(), kl.item(), g.cpu(), pg_metrics))
    (pg0, kl0, g0, m0), (pg1, kl1, g1, m1) = results
    assert pg1 == pytest.approx(pg0, rel=1e-9) and kl1 == pytest.approx(kl0, rel=1e-9)
    torch.testing.assert_close(g1, g0)
    assert m1 == pytest.approx(m0, rel=1e-9)


@pytest.mark.parametrize("K", [1, 4])
def test_pipeline_from_logits_to_gradient_matches_brute_force(K):
    """logits -> logit_stats -> build_support -> compute_rewards -> compute_advantages -> slot_logprobs ->
    policy_loss: the gradient equals -sum_c A(c) grad log p(v_c) with A from a float64 brute force of the spec
    (only_stu, student_p: A(c) = p(v_c) / sum_S p * (log q(v_c) - log p(v_c)), S = student top-K), non-zero at K = 1,
    and exactly zero when the teacher is the student."""
    from opd.core.advantages import compute_advantages
    from opd.core.logits import logit_stats
    from opd.core.rewards import compute_rewards
    from opd.core.support import build_support, slot_logprobs

    gen = torch.Generator().manual_seed(40 + K)
    N, T, D, V = 3, 5, 4, 13
    x, W = linear_model(gen, N, T, D, V)
    mask = ragged_mask(gen, N, T)
    teacher_logits = (x @ W.detach()) + torch.randn(N, T, V, generator=gen, dtype=F64)
    cfg = OPDConfig(top_k=K)

    def pipeline(t_logits):
        logits = x @ W
        with torch.no_grad():
            s = logit_stats(logits.detach(), k=K)
            t = logit_stats(t_logits, k=K, ids_NTJ=s.topk_ids_NTK)
            sup = build_support(
                "only_stu",
                student_topk_ids_NTK=s.topk_ids_NTK,
                teacher_topk_ids_NTK=t.topk_ids_NTK,
                student_lp_at_student_NTK=s.topk_lp_NTK,
                teacher_lp_at_student_NTK=t.lp_at_ids_NTJ,
            )
            adv = compute_advantages(cfg, token_rewards=compute_rewards(cfg, sup), response_mask_NT=mask)
        lp = slot_logprobs(logits, sup.ids_NTC, sup.valid_NTC, has_tail=sup.has_tail)
        loss, _ = policy_loss(lp, lp.detach(), adv, mask, sup.valid_NTC, cfg)
        (grad,) = torch.autograd.grad(loss, W)
        return grad, sup

    grad, sup = pipeline(teacher_logits)
    # brute force, float64, straight from the spec
    lp_full = torch.log_softmax(x @ W.detach(), -1)
    lq_full = torch.log_softmax(teacher_logits, -1)
    ids = torch.empty(N, T, K, dtype=torch.long)
    adv = torch.zeros(N, T, K, dtype=F64)
    for n in range(N):
        for t in range(T):
            order = sorted(range(V), key=lambda v: -lp_full[n, t, v].item())[:K]
            z = sum(lp_full[n, t, v].exp().item() for v in order)
            for c, v in enumerate(order):
                ids[n, t, c] = v
                p = lp_full[n, t, v].exp().item()
                adv[n, t, c] = p / z * (lq_full[n, t, v] - lp_full[n, t, v]).item() * mask[n, t].item()
    assert torch.equal(sup.ids_NTC, ids)
    want = analytic_pg_grad(x, W, ids, adv, torch.ones(N, T, K, dtype=torch.bool), mask, "token-mean")
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)  # rewards are float32 (logit_stats)
    assert want.abs().max() > 1e-3
    same, _ = pipeline(x @ W.detach())
    assert same.abs().max() == 0
