"""Teachability (overlap-mass gating of the rewards) vs a set-based float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from opd.core.config import OPDConfig
from opd.core.rewards import compute_rewards
from opd.core.support import build_support
from opd.core.teachability import gate_rewards, overlap_masses_NT, shared_mass_NT, teachability_weight_NT


def topk_inputs(seed: int, V: int = 30, K: int = 5):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 6, V, generator=gen, dtype=torch.float64) * 2
    t = s + torch.randn(2, 6, V, generator=gen, dtype=torch.float64) * 2
    t[0, 0] = -s[0, 0]  # disjoint top-k
    t[0, 1] = s[0, 1]  # identical
    lp, lq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    S, T = lp.topk(K, -1).indices, lq.topk(K, -1).indices
    return lp, lq, S, T


def test_overlap_masses_match_sets_and_are_side_independent():
    lp, lq, S, T = topk_inputs(0)
    P, Q = overlap_masses_NT(S, T, lp.gather(-1, S).float(), lq.gather(-1, S).float())
    P2, Q2 = overlap_masses_NT(T, S, lp.gather(-1, T).float(), lq.gather(-1, T).float())
    for n in range(2):
        for t in range(6):
            shared = set(S[n, t].tolist()) & set(T[n, t].tolist())
            assert P[n, t].item() == pytest.approx(sum(math.exp(lp[n, t, v]) for v in shared), abs=1e-6)
            assert Q[n, t].item() == pytest.approx(sum(math.exp(lq[n, t, v]) for v in shared), abs=1e-6)
    torch.testing.assert_close(P, P2)
    torch.testing.assert_close(Q, Q2)
    assert P[0, 0] == 0 and Q[0, 0] == 0  # disjoint
    assert P[0, 1].item() == pytest.approx(lp[0, 1].topk(5).values.exp().sum().item(), abs=1e-6)  # identical
    assert 0 < P.mean() < 1
    torch.testing.assert_close(
        shared_mass_NT(S, T, lp.gather(-1, S).float(), lq.gather(-1, S).float()), torch.minimum(P, Q)
    )


def test_mask_and_weight_modes():
    mass = torch.tensor([[0.0, 0.2, 0.5, 0.8, 1.0]])
    assert torch.equal(teachability_weight_NT(mass, "off", 0.5), torch.ones(1, 5))
    assert torch.equal(teachability_weight_NT(mass, "mask", 0.5), torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]]))
    torch.testing.assert_close(teachability_weight_NT(mass, "weight", 0.5), torch.tensor([[0.0, 0.4, 1.0, 1.0, 1.0]]))
    assert torch.equal(teachability_weight_NT(mass, "weight", 0.0), torch.ones(1, 5))
    assert torch.equal(teachability_weight_NT(mass, "mask", 1.0), torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]]))


def test_gating_rewards_end_to_end():
    """Gated rewards vanish at low-overlap positions, shrink linearly in weight mode, and are untouched elsewhere."""
    lp, lq, S, T = topk_inputs(1)
    slp, tlp = lp.gather(-1, S).float(), lq.gather(-1, S).float()
    sup = build_support(
        "only_stu",
        student_topk_ids_NTK=S,
        teacher_topk_ids_NTK=T,
        student_lp_at_student_NTK=slp,
        teacher_lp_at_student_NTK=tlp,
    )
    rewards = compute_rewards(OPDConfig(top_k=5, teachability="mask"), sup)
    mass = shared_mass_NT(S, T, slp, tlp)
    low = mass < 0.3
    assert low.any() and (~low).any()  # both kinds of position present
    inputs = dict(
        student_topk_ids_NTK=S, teacher_topk_ids_NTK=T, student_topk_lp_NTK=slp, teacher_lp_at_student_NTK=tlp
    )
    masked, w = gate_rewards(rewards, OPDConfig(top_k=5, teachability="mask", teachability_threshold=0.3), **inputs)
    assert (masked[low] == 0).all() and torch.equal(masked[~low], rewards[~low])
    assert torch.equal(w, low.logical_not().float())
    weighted, _ = gate_rewards(rewards, OPDConfig(top_k=5, teachability="weight", teachability_threshold=0.3), **inputs)
    torch.testing.assert_close(weighted[low], rewards[low] * (mass[low] / 0.3)[:, None])
    assert torch.equal(weighted[~low], rewards[~low])
    untouched, none = gate_rewards(rewards, OPDConfig(top_k=5), **inputs)  # off by default
    assert untouched is rewards and none is None


@pytest.mark.parametrize("mode,threshold,match", [("soft", 0.5, "mode 'soft'"), ("mask", 1.5, "threshold=1.5")])
def test_bad_settings_are_named(mode, threshold, match):
    with pytest.raises(ValueError, match=match):
        teachability_weight_NT(torch.zeros(1, 1), mode, threshold)
