"""Advantage estimators vs numpy / python-loop references on random ragged batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opd.core.advantages import (
    ADV_ESTIMATORS,
    GRPO_EPS,
    compute_advantages,
    full_vocab_outcome_advantages,
    grpo_outcome_advantage_N,
    register_estimator,
    with_sampled_slot,
)
from opd.core.config import OPDConfig


def ragged_mask(gen: torch.Generator, N: int, T: int) -> torch.Tensor:
    lengths = torch.randint(1, T + 1, (N,), generator=gen)
    return (torch.arange(T)[None, :] < lengths[:, None]).float()


def np_group_adv(scores: np.ndarray, groups: np.ndarray, by_std: bool) -> np.ndarray:
    out = np.zeros_like(scores, dtype=np.float64)
    for g in np.unique(groups):
        idx = np.where(groups == g)[0]
        if len(idx) < 2:
            continue
        s = scores[idx].astype(np.float64)
        a = s - s.mean()
        if by_std:
            a = a / (s.std(ddof=1) + GRPO_EPS)
        out[idx] = a
    return out


def test_registry_rejects_duplicates_and_unknowns():
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("grpo", needs_token_rewards=False, needs_outcome_scores=True, needs_group_index=True)(
            lambda **kw: None
        )
    with pytest.raises(
        ValueError,
        match=r"unknown advantage estimator 'gpro'; valid: token_reward_direct, token_reward_direct_plus_grpo, "
        r"token_grpo, grpo",
    ):
        ADV_ESTIMATORS.get("gpro")
    assert ADV_ESTIMATORS.get("grpo").needs_outcome_scores and not ADV_ESTIMATORS.get("grpo").needs_token_rewards
    assert ADV_ESTIMATORS.get("token_reward_direct").needs_token_rewards
    assert not ADV_ESTIMATORS.get("token_reward_direct").needs_outcome_scores


@pytest.mark.parametrize("by_std", [True, False])
def test_grpo_outcome_matches_numpy_with_singletons_and_arbitrary_uids(by_std):
    gen = torch.Generator().manual_seed(1)
    groups = torch.tensor([7, 7, 7, 7, 42, 42, 42, 3, 100, 100, 100, 100, 100])  # 3 is a single-sample group
    scores = torch.rand(groups.numel(), generator=gen)
    scores[8:] = 1.0  # a constant group: 0 advantage, not inf/nan
    got = grpo_outcome_advantage_N(scores, groups, by_std)
    want = np_group_adv(scores.numpy(), groups.numpy(), by_std)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert got[7] == 0 and torch.all(got[8:] == 0)


def test_grpo_estimator_broadcasts_over_valid_tokens():
    gen = torch.Generator().manual_seed(2)
    N, T = 8, 6
    mask = ragged_mask(gen, N, T)
    groups = torch.arange(N) // 4
    scores = torch.randint(0, 2, (N,), generator=gen).float()
    cfg = OPDConfig(adv_estimator="grpo", top_k=0)
    adv = compute_advantages(
        cfg, token_rewards=None, response_mask_NT=mask, group_index_N=groups, outcome_scores_N=scores
    )
    want = np_group_adv(scores.numpy(), groups.numpy(), True)
    for n in range(N):
        for t in range(T):
            assert adv[n, t].item() == pytest.approx(want[n] * mask[n, t].item(), abs=1e-5)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 4)])
def test_token_reward_direct_is_masked_reward(shape):
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(shape, generator=gen)
    mask = ragged_mask(gen, 5, 7)
    adv = compute_advantages(OPDConfig(), token_rewards=rewards, response_mask_NT=mask)
    assert adv.shape == rewards.shape
    for idx in np.ndindex(*shape):
        assert adv[idx].item() == pytest.approx(rewards[idx].item() * mask[idx[0], idx[1]].item())


def test_direct_plus_grpo_2d_adds_weighted_outcome():
    gen = torch.Generator().manual_seed(4)
    N, T = 6, 5
    rewards, mask = torch.randn(N, T, generator=gen), ragged_mask(gen, N, T)
    groups, scores = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    cfg = OPDConfig(adv_estimator="token_reward_direct_plus_grpo", grpo_outcome_weight=0.3, top_k=0)
    adv = compute_advantages(
        cfg, token_rewards=rewards, response_mask_NT=mask, group_index_N=groups, outcome_scores_N=scores
    )
    a_out = np_group_adv(scores.numpy(), groups.numpy(), True)
    want = (rewards.double().numpy() + 0.3 * a_out[:, None]) * mask.numpy()
    np.testing.assert_allclose(adv.double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_direct_plus_grpo_3d_puts_outcome_on_an_extra_sampled_slot():
    gen = torch.Generator().manual_seed(5)
    N, T, C = 4, 5, 3
    rewards, mask = torch.randn(N, T, C, generator=gen), ragged_mask(gen, N, T)
    groups, scores = torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    cfg = OPDConfig(adv_estimator="token_reward_direct_plus_grpo", grpo_outcome_weight=2.0)
    adv = compute_advantages(
        cfg, token_rewards=rewards, response_mask_NT=mask, group_index_N=groups, outcome_scores_N=scores
    )
    assert adv.shape == (N, T, C + 1)
    torch.testing.assert_close(adv[..., :C], rewards * mask[..., None])
    a_out = torch.tensor(np_group_adv(scores.numpy(), groups.numpy(), True), dtype=torch.float32)
    torch.testing.assert_close(adv[..., C], 2.0 * a_out[:, None] * mask)
    # the matching ids/validity for the engine's gather
    ids, valid = torch.randint(0, 9, (N, T, C), generator=gen), torch.rand(N, T, C, generator=gen) > 0.3
    sampled = torch.randint(0, 9, (N, T), generator=gen)
    ids2, valid2 = with_sampled_slot(ids, valid, sampled, mask)
    assert torch.equal(ids2[..., :C], ids) and torch.equal(ids2[..., C], sampled)
    assert torch.equal(valid2[..., :C], valid) and torch.equal(valid2[..., C], mask.bool())


def test_direct_plus_grpo_gradient_is_direct_plus_weighted_grpo():
    """Surrogate with the C+1 advantage == direct OPD surrogate + w * GRPO surrogate on the sampled token."""
    gen = torch.Generator().manual_seed(6)
    N, T, C, V = 4, 3, 2, 7
    mask = ragged_mask(gen, N, T)
    logits = torch.randn(N, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (N, T, C), generator=gen)
    sampled = torch.randint(0, V, (N, T), generator=gen)
    rewards = torch.randn(N, T, C, generator=gen, dtype=torch.float64)
    groups, scores = torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 0.0, 1.0, 1.0])
    w = 0.7
    cfg = OPDConfig(adv_estimator="token_reward_direct_plus_grpo", grpo_outcome_weight=w)
    adv = compute_advantages(
        cfg, token_rewards=rewards, response_mask_NT=mask, group_index_N=groups, outcome_scores_N=scores
    )
    ids2, _ = with_sampled_slot(ids, torch.ones_like(ids, dtype=torch.bool), sampled, mask)
    lp = torch.log_softmax(logits, -1)
    (g_combined,) = torch.autograd.grad(-(adv * lp.gather(-1, ids2)).sum(), logits, retain_graph=True)
    direct = -(rewards * mask[..., None] * lp.gather(-1, ids)).sum()
    a_out = grpo_outcome_advantage_N(scores, groups, True).double()
    grpo_term = -(a_out[:, None] * mask * lp.gather(-1, sampled[..., None]).squeeze(-1)).sum()
    (g_ref,) = torch.autograd.grad(direct + w * grpo_term, logits)
    torch.testing.assert_close(g_combined, g_ref)
    assert g_ref.abs().sum() > 0


@pytest.mark.parametrize("by_std", [True, False])
def test_token_grpo_matches_loop(by_std):
    gen = torch.Generator().manual_seed(7)
    N, T = 9, 8
    mask = ragged_mask(gen, N, T)
    mask[8, 1:] = 0  # rollout 8 is alone in its group and has one token -> 0
    rewards = torch.randn(N, T, generator=gen)
    groups = torch.tensor([5, 5, 5, 9, 9, 2, 2, 2, 11])
    cfg = OPDConfig(adv_estimator="token_grpo", top_k=0, norm_adv_by_std=by_std)
    adv = compute_advantages(cfg, token_rewards=rewards, response_mask_NT=mask, group_index_N=groups)
    r, m, g = rewards.double().numpy(), mask.numpy(), groups.numpy()
    want = np.zeros((N, T))
    for gid in np.unique(g):
        rows = np.where(g == gid)[0]
        vals = np.array([r[n, t] for n in rows for t in range(T) if m[n, t] > 0])
        if len(vals) < 2:
            continue
        mean, std = vals.mean(), vals.std(ddof=1)
        for n in rows:
            normed = [((r[n, t] - mean) / (std + GRPO_EPS) if by_std else r[n, t] - mean) * m[n, t] for t in range(T)]
            for t in range(T):
                want[n, t] = sum(normed[t:]) * m[n, t]
    np.testing.assert_allclose(adv.double().numpy(), want, rtol=1e-4, atol=1e-5)
    assert torch.all(adv[8] == 0)


def test_missing_inputs_raise_naming_them():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="needs token_rewards"):
        compute_advantages(OPDConfig(), token_rewards=None, response_mask_NT=mask)
    with pytest.raises(ValueError, match="needs outcome_scores_N"):
        compute_advantages(OPDConfig(adv_estimator="grpo", top_k=0), token_rewards=None, response_mask_NT=mask)
    with pytest.raises(ValueError, match="'token_grpo' needs group_index_N"):
        compute_advantages(OPDConfig(adv_estimator="token_grpo", top_k=0), token_rewards=mask, response_mask_NT=mask)
    with pytest.raises(ValueError, match=r"token_rewards must be \[N, T\] or \[N, T, C\]"):
        compute_advantages(OPDConfig(), token_rewards=torch.zeros(3, 3), response_mask_NT=mask)
    with pytest.raises(ValueError, match="group_index_N must be"):
        compute_advantages(
            OPDConfig(adv_estimator="grpo", top_k=0),
            token_rewards=None,
            response_mask_NT=mask,
            group_index_N=torch.zeros(3),
            outcome_scores_N=torch.zeros(2),
        )


def test_advantages_carry_no_gradient():
    rewards = torch.randn(2, 3, requires_grad=True)
    adv = compute_advantages(OPDConfig(top_k=0), token_rewards=rewards, response_mask_NT=torch.ones(2, 3))
    assert not adv.requires_grad


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
        ),
    ],
)
@pytest.mark.parametrize("estimator", ADV_ESTIMATORS.names())
def test_estimators_on_device_match_cpu(device, estimator):
    gen = torch.Generator().manual_seed(9)
    N, T = 6, 5
    mask = ragged_mask(gen, N, T)
    rewards = torch.randn(N, T, generator=gen)
    kw = dict(
        token_rewards=rewards,
        response_mask_NT=mask,
        group_index_N=torch.tensor([3, 3, 3, 8, 8, 1]),
        outcome_scores_N=torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0]),
    )
    cfg = OPDConfig(adv_estimator=estimator, top_k=0)
    cpu = compute_advantages(cfg, **kw)
    dev = compute_advantages(cfg, **{k: v.to(device) for k, v in kw.items()})
    assert dev.device.type == device
    torch.testing.assert_close(dev.cpu(), cpu)


def test_full_vocab_outcome_advantages():
    """top_k = -1: direct gives no advantage (the loss carries it); direct + GRPO gives w * GRPO on valid tokens."""
    gen = torch.Generator().manual_seed(5)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    mask = ragged_mask(gen, 6, 9)
    kw = dict(response_mask_NT=mask, group_index_N=groups, outcome_scores_N=scores)
    assert full_vocab_outcome_advantages(OPDConfig(top_k=-1), **kw) is None
    got = full_vocab_outcome_advantages(
        OPDConfig(top_k=-1, adv_estimator="token_reward_direct_plus_grpo", grpo_outcome_weight=0.5), **kw
    )
    want = 0.5 * np_group_adv(scores.numpy(), groups.numpy(), True)[:, None] * mask.double().numpy()
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="for top_k = -1"):
        full_vocab_outcome_advantages(OPDConfig(top_k=4), **kw)
