"""Top-k supports and per-candidate rewards against a float64 set-based brute force (docs/algorithm.md §2-§3).

The reference builds each position's candidate set with Python sets straight from the spec's table, so it shares no
slot-layout code with opd.core.support. Positions mix the cases that break kernels: related models, disjoint top-k
(empty intersection), identical models (empty symmetric difference), ties, and all-zero padding rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from opd.core.config import OPDConfig
from opd.core.rewards import WEIGHT_MODES, candidate_rewards, candidate_weights, compute_rewards, sampled_token_rewards
from opd.core.support import (
    STRATEGIES,
    TAIL_ID,
    TAIL_MIN_MASS,
    build_support,
    sampled_token_support,
    slot_logprobs,
    tail_logprob,
    topk_membership,
)

STRATEGY_NAMES = STRATEGIES.names()
WEIGHT_MODE_NAMES = WEIGHT_MODES.names()


def mixed_logits(gen: torch.Generator, V: int, K: int):
    """Student and teacher logits [2, 4, V] (float64) whose 8 positions cover the edge cases."""
    s = torch.randn(2, 4, V, generator=gen, dtype=torch.float64) * 2.5
    t = s + torch.randn(2, 4, V, generator=gen, dtype=torch.float64) * 1.5  # related
    t[0, 1] = s[0, 1] * 3.0 + torch.randn(V, generator=gen, dtype=torch.float64)  # sharper teacher
    t[0, 2] = -s[0, 2]  # reversed: top-k sets disjoint whenever 2K <= V
    t[0, 3] = s[0, 3]  # identical distribution at this position
    tie = torch.randint(-1, 2, (V,), generator=gen).double()
    s[1, 0], t[1, 0] = tie, tie.flip(0)  # exact ties in both
    s[1, 1] = 0.0  # padding-like rows: uniform distributions
    t[1, 1] = 0.0
    return s, t


def make_inputs(s_logits, t_logits, K):
    lp64 = torch.log_softmax(s_logits, -1)
    lq64 = torch.log_softmax(t_logits, -1)
    S = lp64.topk(K, dim=-1).indices
    T = lq64.topk(K, dim=-1).indices
    lp, lq = lp64.float(), lq64.float()  # what logit_stats would hand over
    kw = dict(
        student_topk_ids_NTK=S,
        teacher_topk_ids_NTK=T,
        student_lp_at_student_NTK=lp.gather(-1, S),
        teacher_lp_at_student_NTK=lq.gather(-1, S),
        student_lp_at_teacher_NTK=lp.gather(-1, T),
        teacher_lp_at_teacher_NTK=lq.gather(-1, T),
    )
    return kw, lp.double(), lq.double()


def ref_candidates(strategy: str, s_ids: list[int], t_ids: list[int]) -> list[int]:
    if strategy == "only_stu":
        return s_ids
    if strategy == "only_tch":
        return t_ids
    if strategy == "intersection":
        return [v for v in s_ids if v in set(t_ids)]
    if strategy == "union":
        return s_ids + [v for v in t_ids if v not in set(s_ids)]
    if strategy == "union-intersection":
        return [v for v in s_ids if v not in set(t_ids)] + [v for v in t_ids if v not in set(s_ids)]
    raise AssertionError(strategy)


def ref_rewards(strategy, mode, lp_V, lq_V, s_ids, t_ids, tail):
    """{token (or 'tail'): reward} for one position, float64, straight from docs/algorithm.md §2-§3."""
    cands = ref_candidates(strategy, s_ids, t_ids)
    lp = {v: lp_V[v].item() for v in cands}
    lq = {v: lq_V[v].item() for v in cands}
    if tail:
        lp["tail"] = math.log(max(1.0 - sum(math.exp(x) for x in lp.values()), TAIL_MIN_MASS))
        lq["tail"] = math.log(max(1.0 - sum(math.exp(lq[v]) for v in cands), TAIL_MIN_MASS))
    base = {v: {"student_p": math.exp(lp[v]), "teacher_p": math.exp(lq[v]), "none": 1.0}[mode] for v in lp}
    z = sum(base.values()) if strategy != "union-intersection" else 1.0
    return {v: base[v] / z * (lq[v] - lp[v]) for v in lp}


CASES = [(7, 1), (7, 3), (7, 7), (50, 4), (300, 16)]


@pytest.mark.parametrize("V,K", CASES)
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_support_and_rewards_match_set_reference(strategy, V, K, tail):
    gen = torch.Generator().manual_seed(V * 100 + K)
    kw, lp, lq = make_inputs(*mixed_logits(gen, V, K), K)
    support = build_support(strategy, tail_bucket=tail, **kw)
    C = STRATEGIES.get(strategy).slots_per_k * K + int(tail)
    assert support.ids_NTC.shape == (2, 4, C) and support.has_tail == tail
    for mode in WEIGHT_MODE_NAMES:
        cfg = OPDConfig(top_k=K, top_k_strategy=strategy, reward_weight_mode=mode, tail_bucket=tail)
        rewards = compute_rewards(cfg, support)
        assert rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
        assert (rewards[~support.valid_NTC] == 0).all()
        for n in range(2):
            for t in range(4):
                s_ids, t_ids = kw["student_topk_ids_NTK"][n, t].tolist(), kw["teacher_topk_ids_NTK"][n, t].tolist()
                ref = ref_rewards(strategy, mode, lp[n, t], lq[n, t], s_ids, t_ids, tail)
                valid = support.valid_NTC[n, t]
                got_ids = ["tail" if i == TAIL_ID else i for i in support.ids_NTC[n, t][valid].tolist()]
                assert sorted(map(str, got_ids)) == sorted(map(str, ref)), (n, t, "valid slots != candidate set")
                got = dict(zip(got_ids, rewards[n, t][valid].double().tolist()))
                for v, r in ref.items():
                    assert got[v] == pytest.approx(r, abs=2e-6, rel=1e-5), (mode, n, t, v)


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_slot_layout_is_exactly_the_spec(strategy):
    gen = torch.Generator().manual_seed(11)
    kw, _, _ = make_inputs(*mixed_logits(gen, 20, 5), 5)
    sup = build_support(strategy, **kw)
    S, T = kw["student_topk_ids_NTK"], kw["teacher_topk_ids_NTK"]
    s_in_t = (S[..., :, None] == T[..., None, :]).any(-1)
    t_in_s = (T[..., :, None] == S[..., None, :]).any(-1)
    expected = {
        "only_stu": (S, torch.ones_like(s_in_t)),
        "only_tch": (T, torch.ones_like(t_in_s)),
        "intersection": (S, s_in_t),
        "union": (torch.cat([S, T], -1), torch.cat([torch.ones_like(s_in_t), ~t_in_s], -1)),
        "union-intersection": (torch.cat([S, T], -1), torch.cat([~s_in_t, ~t_in_s], -1)),
    }[strategy]
    assert torch.equal(sup.ids_NTC, expected[0])
    assert torch.equal(sup.valid_NTC, expected[1])
    from_student = strategy in ("only_stu", "intersection")
    assert torch.equal(sup.in_teacher_topk_NTC[..., :5], s_in_t if strategy != "only_tch" else torch.ones_like(s_in_t))
    assert torch.equal(sup.in_student_topk_NTC[..., :5], torch.ones_like(s_in_t) if strategy != "only_tch" else t_in_s)
    if from_student:
        assert torch.equal(sup.student_lp_NTC, kw["student_lp_at_student_NTK"])
        assert torch.equal(sup.teacher_lp_NTC, kw["teacher_lp_at_student_NTK"])


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("mode", WEIGHT_MODE_NAMES)
@pytest.mark.parametrize("tail", [False, True])
def test_identical_models_give_zero_rewards(strategy, mode, tail):
    gen = torch.Generator().manual_seed(12)
    s, _ = mixed_logits(gen, 40, 6)
    kw, _, _ = make_inputs(s, s.clone(), 6)
    sup = build_support(strategy, tail_bucket=tail, **kw)
    rewards = compute_rewards(
        OPDConfig(top_k=6, top_k_strategy=strategy, reward_weight_mode=mode, tail_bucket=tail), sup
    )
    assert torch.equal(rewards, torch.zeros_like(rewards))
    if strategy == "union-intersection":  # the symmetric difference is empty everywhere (tail aside)
        assert sup.valid_NTC[..., :12].sum() == 0


def test_empty_candidate_sets_give_zero_not_nan():
    gen = torch.Generator().manual_seed(13)
    s = torch.randn(1, 3, 30, generator=gen, dtype=torch.float64)
    kw, _, _ = make_inputs(s, -s, 4)  # reversed teacher: S and T disjoint at every position
    for mode in WEIGHT_MODE_NAMES:
        sup = build_support("intersection", **kw)
        assert not sup.valid_NTC.any()
        w = candidate_weights(sup, mode, normalise=True)
        r = candidate_rewards(sup, mode, normalise=True)
        assert torch.equal(w, torch.zeros_like(w)) and torch.equal(r, torch.zeros_like(r))


def test_normalised_weights_survive_float32_underflow():
    """p ~ e^-200 underflows to 0 in float32: weights must still be the renormalised distribution, not 0/0."""
    lp = torch.tensor([[[-200.0, -201.0, -202.0]]])
    lq = torch.tensor([[[-199.0, -201.5, -203.0]]])
    ids = torch.tensor([[[3, 4, 5]]])
    sup = build_support(
        "only_stu",
        student_topk_ids_NTK=ids,
        teacher_topk_ids_NTK=ids,
        student_lp_at_student_NTK=lp,
        teacher_lp_at_student_NTK=lq,
    )
    w = candidate_weights(sup, "student_p", normalise=True)
    ref = torch.softmax(lp.double(), -1)
    torch.testing.assert_close(w.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        candidate_rewards(sup, "student_p", normalise=True).double(), ref * (lq - lp).double(), atol=1e-5, rtol=1e-6
    )


def test_k1_keeps_signal_and_none_mode_is_uniform():
    """K = 1: the normalised weight is 1 and the reward is the full-vocabulary log-ratio (not renormalised to 0)."""
    gen = torch.Generator().manual_seed(14)
    kw, lp, lq = make_inputs(*mixed_logits(gen, 25, 1), 1)
    sup = build_support("only_stu", **kw)
    r = compute_rewards(OPDConfig(top_k=1), sup)
    torch.testing.assert_close(r, kw["teacher_lp_at_student_NTK"] - kw["student_lp_at_student_NTK"])
    assert r.abs().sum() > 0
    kw5, _, _ = make_inputs(*mixed_logits(gen, 25, 5), 5)
    sup5 = build_support("union", **kw5)
    w = candidate_weights(sup5, "none", normalise=True)
    n_valid = sup5.valid_NTC.sum(-1, keepdim=True).float()
    torch.testing.assert_close(w, torch.where(sup5.valid_NTC, 1.0 / n_valid, torch.zeros_like(w)))


def test_union_intersection_uses_raw_weights():
    gen = torch.Generator().manual_seed(15)
    kw, _, _ = make_inputs(*mixed_logits(gen, 60, 8), 8)
    sup = build_support("union-intersection", **kw)
    w = candidate_weights(sup, "teacher_p", normalise=False)
    torch.testing.assert_close(w, torch.where(sup.valid_NTC, sup.teacher_lp_NTC.exp(), torch.zeros_like(w)))
    assert w.sum(-1).max() < 1.0  # raw probabilities of a strict subset: not renormalised to 1


def test_tail_bucket_completes_the_mass():
    gen = torch.Generator().manual_seed(16)
    kw, lp, _ = make_inputs(*mixed_logits(gen, 50, 4), 4)
    sup = build_support("only_stu", tail_bucket=True, **kw)
    assert (sup.ids_NTC[..., -1] == TAIL_ID).all() and sup.valid_NTC[..., -1].all()
    assert not sup.in_student_topk_NTC[..., -1].any() and not sup.in_teacher_topk_NTC[..., -1].any()
    total = sup.student_lp_NTC.double().exp().sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)
    # only_stu + student_p + tail: the normalisation is a no-op, weights are the probabilities themselves
    w = candidate_weights(sup, "student_p", normalise=True)
    torch.testing.assert_close(w, sup.student_lp_NTC.exp(), atol=1e-6, rtol=1e-5)
    # K = V: the top-k covers everything, the tail is floored and finite, and contributes exactly 0
    kw7, _, _ = make_inputs(*mixed_logits(gen, 7, 7), 7)
    sup7 = build_support("only_stu", tail_bucket=True, **kw7)
    assert torch.equal(sup7.student_lp_NTC[..., -1], torch.full((2, 4), math.log(TAIL_MIN_MASS)))
    r7 = compute_rewards(OPDConfig(top_k=7, tail_bucket=True), sup7)
    assert (r7[..., -1] == 0).all()


def test_tail_logprob_is_accurate_for_small_tails():
    lp = torch.log(torch.tensor([[0.7, 0.2999, 1e-9]], dtype=torch.float64)).float()
    valid = torch.tensor([[True, True, False]])
    got = tail_logprob(lp, valid).item()
    assert got == pytest.approx(math.log(1e-4), rel=1e-4)  # float32 1 - 0.9999 would be ~1e-3 off in the log


def test_sampled_token_rewards_and_support():
    gen = torch.Generator().manual_seed(17)
    lp64 = torch.log_softmax(torch.randn(3, 6, 20, generator=gen, dtype=torch.float64), -1)
    lq64 = torch.log_softmax(torch.randn(3, 6, 20, generator=gen, dtype=torch.float64), -1)
    y = torch.randint(0, 20, (3, 6), generator=gen)
    lp, lq = lp64.gather(-1, y[..., None])[..., 0], lq64.gather(-1, y[..., None])[..., 0]
    r = sampled_token_rewards(lp.float(), lq.float())
    torch.testing.assert_close(r.double(), lq - lp, atol=1e-6, rtol=1e-6)
    sup = sampled_token_support(y, lp.float(), lq.float())
    assert sup.ids_NTC.shape == (3, 6, 1)
    for mode in WEIGHT_MODE_NAMES:  # weight 1 whatever the mode: the K = 0 reward is the plain log-ratio
        rc = compute_rewards(OPDConfig(top_k=0, reward_weight_mode=mode), sup)
        torch.testing.assert_close(rc[..., 0], r)


def test_topk_membership_matches_brute_force():
    gen = torch.Generator().manual_seed(18)
    a = torch.randint(0, 12, (4, 5, 6), generator=gen)
    b = torch.randint(0, 12, (4, 5, 3), generator=gen)
    ref = (a[..., :, None] == b[..., None, :]).any(-1)
    assert torch.equal(topk_membership(a, b), ref)
    assert ref.any() and not ref.all()


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_declared_needs_are_exact(strategy):
    """A strategy that declares it does not need an input runs without it and gives the same support."""
    spec = STRATEGIES.get(strategy)
    gen = torch.Generator().manual_seed(19)
    kw, _, _ = make_inputs(*mixed_logits(gen, 30, 5), 5)
    full = build_support(strategy, **kw)
    for name in (
        "student_lp_at_student_NTK",
        "teacher_lp_at_student_NTK",
        "student_lp_at_teacher_NTK",
        "teacher_lp_at_teacher_NTK",
    ):
        if name in spec.inputs:
            with pytest.raises(ValueError, match=name):
                build_support(strategy, **{**kw, name: None})
        else:
            sparse = build_support(strategy, **{**kw, name: None})
            for field in ("ids_NTC", "valid_NTC", "student_lp_NTC", "teacher_lp_NTC"):
                assert torch.equal(getattr(sparse, field), getattr(full, field)), (name, field)
    assert spec.needs_student_lp_at_teacher == (strategy != "only_stu" and strategy != "intersection")
    assert spec.needs_teacher_lp_at_student == (strategy != "only_tch")


def test_bad_inputs_are_named():
    ids = torch.zeros(1, 2, 3, dtype=torch.long)
    lp = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="unknown top-k strategy 'topk'"):
        build_support(
            "topk",
            student_topk_ids_NTK=ids,
            teacher_topk_ids_NTK=ids,
            student_lp_at_student_NTK=lp,
            teacher_lp_at_student_NTK=lp,
        )
    with pytest.raises(ValueError, match="teacher_lp_at_student_NTK has shape"):
        build_support(
            "only_stu",
            student_topk_ids_NTK=ids,
            teacher_topk_ids_NTK=ids,
            student_lp_at_student_NTK=lp,
            teacher_lp_at_student_NTK=lp[..., :2],
        )
    sup = build_support(
        "only_stu",
        student_topk_ids_NTK=ids,
        teacher_topk_ids_NTK=ids,
        student_lp_at_student_NTK=lp,
        teacher_lp_at_student_NTK=lp,
    )
    with pytest.raises(ValueError, match="expects 6"):
        compute_rewards(OPDConfig(top_k=3, top_k_strategy="union"), sup)
    with pytest.raises(ValueError, match="full vocabulary"):
        compute_rewards(OPDConfig(top_k=-1), sup)
    with pytest.raises(ValueError, match="unknown reward weight mode"):
        candidate_rewards(sup, "student", normalise=True)


@pytest.mark.parametrize("tail", [False, True])
def test_slot_logprobs_value_and_gradient(tail):
    """The update's re-gather (tail included) matches a float64 log_softmax reference in value and gradient."""
    gen = torch.Generator().manual_seed(20)
    s, t = mixed_logits(gen, 40, 5)
    kw, _, _ = make_inputs(s, t, 5)
    sup = build_support("union", tail_bucket=tail, **kw)
    upstream = torch.randn(sup.ids_NTC.shape, generator=gen, dtype=torch.float64) * sup.valid_NTC
    x = s.float().requires_grad_(True)
    got = slot_logprobs(x, sup.ids_NTC, sup.valid_NTC, has_tail=sup.has_tail, temperature=0.8, chunk_size=3)
    (got.double() * upstream).sum().backward()
    x64 = s.clone().requires_grad_(True)
    lp64 = torch.log_softmax(x64 / 0.8, -1)
    ids = sup.ids_NTC[..., : sup.ids_NTC.shape[-1] - int(tail)]
    ref = lp64.gather(-1, ids)
    if tail:
        covered = torch.where(sup.valid_NTC[..., :-1], ref.exp(), torch.zeros_like(ref)).sum(-1)
        ref = torch.cat([ref, torch.log1p(-covered)[..., None]], -1)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(got.double(), ref.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=5e-5, rtol=1e-4)
