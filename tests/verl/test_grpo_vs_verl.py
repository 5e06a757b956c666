"""Our `grpo` estimator (opd.core.advantages) against verl's `compute_grpo_outcome_advantage` on random inputs.

Where the conventions agree they are equal. The conventions, side by side:
- the score: verl sums ``token_level_rewards`` over **all** positions (its mask is not applied to the sum); ours takes
  the per-rollout outcome score as given. The OPD trainer mode passes ``rm_scores`` summed over the response, which
  is verl's sum (verl stores the rule reward at the last response token and nothing outside the response);
- the std is the unbiased one (N - 1) in both, and both add eps = 1e-6 to the std; identical scores give 0 in both;
- a prompt with a single rollout: verl uses mean 0 and std 1 (advantage = score / (1 + eps)); ours gives 0 (no
  group to compare with). That is the one difference;
- ours computes in float64 and returns float32; verl computes in float32 (differences ~1e-7).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from opd.core import OPDConfig  # noqa: E402
from opd.core.advantages import compute_advantages  # noqa: E402


def ours(token_level_rewards, response_mask, uids, by_std):
    index = torch.as_tensor(np.unique(uids, return_inverse=True)[1])
    cfg = OPDConfig(top_k=0, adv_estimator="grpo", norm_adv_by_std=by_std)
    return compute_advantages(
        cfg,
        token_rewards=None,
        response_mask_NT=response_mask,
        group_index_N=index,
        outcome_scores_N=token_level_rewards.sum(-1),
    )


def verls(token_level_rewards, response_mask, uids, by_std):
    adv, returns = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards, response_mask, uids, norm_adv_by_std_in_grpo=by_std
    )
    assert torch.equal(adv, returns)
    return adv


def random_batch(g: torch.Generator, min_group: int):
    """B rollouts over 4 prompts (each of at least `min_group` rollouts), random masks, rewards anywhere."""
    n_groups = 4
    sizes = torch.randint(min_group, 5, (n_groups,), generator=g).tolist()
    uids = np.array([f"uid{i}" for i, n in enumerate(sizes) for _ in range(n)], dtype=object)
    perm = torch.randperm(len(uids), generator=g).numpy()
    uids = uids[perm]
    B, T = len(uids), int(torch.randint(1, 9, (1,), generator=g))
    mask = (torch.rand(B, T, generator=g) < 0.8).float()
    mask[:, 0] = 1.0
    rewards = torch.randint(0, 3, (B, T), generator=g).float() * (torch.rand(B, T, generator=g) < 0.3)
    return rewards, mask, uids


@pytest.mark.parametrize("by_std", [True, False])
def test_grpo_equals_verl_where_every_prompt_has_a_group(by_std):
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(200):
        rewards, mask, uids = random_batch(g, min_group=2)
        a, b = ours(rewards, mask, uids, by_std), verls(rewards, mask, uids, by_std)
        assert a.shape == b.shape
        worst = max(worst, float((a - b).abs().max()))
    assert worst < 1e-5, worst


def test_grpo_differs_from_verl_only_on_single_rollout_prompts():
    rewards = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])
    mask = torch.ones(3, 2)
    uids = np.array(["a", "b", "b"], dtype=object)  # prompt "a" has one rollout
    a, b = ours(rewards, mask, uids, True), verls(rewards, mask, uids, True)
    assert torch.allclose(a[1:], b[1:], atol=1e-6)  # the group of two: +-0.7071 in both
    assert torch.allclose(a[1:, 0], torch.tensor([0.70711, -0.70711]), atol=1e-4)
    assert torch.equal(a[0], torch.zeros(2))  # ours: no group to compare with
    assert torch.allclose(b[0], torch.full((2,), 2.0 / (1 + 1e-6)))  # verl: mean 0, std 1


def test_verl_sums_rewards_over_masked_positions_too():
    """verl's score ignores the mask; the trainer mode's outcome (rm_scores summed over the response) matches it."""
    rewards = torch.tensor([[1.0, 5.0], [3.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    uids = np.array(["a", "a", "a"], dtype=object)
    b = verls(rewards, mask, uids, True)
    torch.testing.assert_close(b[:, 0], torch.tensor([1.0, 0.0, -1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(rewards, mask, uids, True), b, atol=1e-5, rtol=0)
