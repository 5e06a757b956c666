"""The update and the reads from output heads (no [T, V] logits; with the full vocabulary one teacher forward per
step) equal the logits path on the same session, and a model whose logits are not its head at its last hidden state
falls back."""

from __future__ import annotations

import pytest
import torch

from opd.engines.local import heads, scoring, trainer, update


def _logits_only(monkeypatch) -> None:
    """Every pass of the step from logits, as for models without a usable output head."""
    monkeypatch.setattr(trainer, "use_output_heads", lambda *a: False)
    monkeypatch.setattr(scoring, "has_output_head", lambda model: False)
    monkeypatch.setattr(update, "has_output_head", lambda model: False)


def _count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "settings",
    [
        {"algo.top_k": -1, "micro_batch_tokens": 40},
        {
            "algo.top_k": -1,
            "algo.adv_estimator": "token_reward_direct_plus_grpo",
            "algo.loss_agg_mode": "seq-mean-token-mean",
        },
    ],
    ids=["full", "full+outcome"],
)
def test_heads_path_equals_the_logits_path(tiny_cfg, monkeypatch, settings):
    results = []
    for via_heads in (True, False):
        torch.manual_seed(0)
        s = trainer.setup(tiny_cfg(**settings))
        assert heads.has_output_head(s.student) and heads.has_output_head(s.teacher)  # checked once, here
        teacher_calls = _count_calls(s.teacher.base_model)
        if not via_heads:
            _logits_only(monkeypatch)
        metrics = trainer.train_step(s, 1)
        results.append((metrics, [p.detach().clone() for p in s.student.parameters()], teacher_calls[0]))
    (m_heads, w_heads, calls_heads), (m_logits, w_logits, calls_logits) = results
    assert calls_logits == 2 * calls_heads  # the logits path runs the teacher again in the update
    for key in ("actor/loss", "actor/full_vocab_loss", "actor/grad_norm", "opd/reverse_kl"):
        assert m_heads[key] == pytest.approx(m_logits[key], rel=1e-5, abs=1e-7), key
    assert m_heads["actor/grad_norm"] > 0
    for a, b in zip(w_heads, w_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_model_with_a_changed_head_falls_back(tiny_cfg, capsys):
    s = trainer.setup(tiny_cfg(**{"algo.top_k": -1}))

    def soft_cap(module, args, out):  # a final logit soft-cap, as some model families have
        out.logits = 30.0 * torch.tanh(out.logits / 30.0) * 1.1
        return out

    s.student.register_forward_hook(soft_cap)
    heads._CHECKED.pop(s.student, None)
    assert not heads.has_output_head(s.student)
    assert not heads.use_output_heads(s.cfg.algo, s.student, s.teacher)
    assert "uses their logits" in capsys.readouterr().err
    metrics = trainer.train_step(s, 1)
    assert metrics["actor/grad_norm"] > 0 and metrics["actor/full_vocab_loss"] == metrics["actor/full_vocab_loss"]


@pytest.mark.parametrize("top_k", [-1, 4])
def test_teacher_reads_from_hidden_states_equal_its_logits_reads(tiny_cfg, monkeypatch, top_k):
    """Scoring with `teacher_hidden` reads the teacher from its hidden states chunk by chunk (its [n, T, V] logits
    are never built): the same reads, and the full-vocabulary KL, as scoring from its logits."""
    from opd.engines.local.scoring import score

    s = trainer.setup(tiny_cfg(**{"algo.top_k": top_k, "algo.chunk_size": 5, "micro_batch_tokens": 40}))
    problems = [s.train_set.problems[i] for i in s.schedule.batch(1)]
    batch = trainer.sample_rollouts(s, problems).batch
    kw = dict(token_budget=s.cfg.micro_batch_tokens, vocab_size=s.vocab_width)
    hidden: list = []
    via_hidden = score(s.student, s.teacher, batch, s.cfg.algo, teacher_hidden=hidden, **kw)
    monkeypatch.setattr(scoring, "has_output_head", lambda model: False)
    via_logits = score(s.student, s.teacher, batch, s.cfg.algo, **kw)
    assert len(hidden) > 1  # several micro-batches
    mask = batch.response_mask_NT.bool()
    t_a, t_b = via_hidden.teacher, via_logits.teacher
    assert torch.equal(t_a.topk_ids_NTK[mask], t_b.topk_ids_NTK[mask])
    for name in ("lp_NT", "entropy_NT", "topk_lp_NTK", "lp_at_other_NTK"):
        torch.testing.assert_close(getattr(t_a, name)[mask], getattr(t_b, name)[mask], rtol=1e-5, atol=1e-5)
    if top_k == -1:
        torch.testing.assert_close(via_hidden.full_kl_NT[mask], via_logits.full_kl_NT[mask], rtol=1e-5, atol=1e-6)
        assert via_logits.full_kl_NT[mask].abs().max() > 0
    else:
        assert via_hidden.full_kl_NT is None and via_logits.full_kl_NT is None


@pytest.mark.parametrize(
    "settings",
    [
        {"algo.top_k": 4, "micro_batch_tokens": 40},
        {"algo.top_k": 4, "algo.top_k_strategy": "union", "algo.tail_bucket": True},
        {"algo.top_k": 4, "algo.adv_estimator": "token_reward_direct_plus_grpo", "algo.use_kl": True},
        {"algo.top_k": 0},
        {"algo.top_k": 0, "algo.adv_estimator": "grpo"},
    ],
    ids=["topk", "union+tail", "outcome+kl", "sampled", "grpo"],
)
def test_slot_update_from_the_students_head_equals_the_logits_path(tiny_cfg, monkeypatch, settings):
    """Top-k and sampled-token supports: the student's slot log-probs from its hidden states (and the teacher's and
    the reference's reads from theirs) give the logits path's step; no lm_head runs in scoring or the update."""
    results = []
    for via_heads in (True, False):
        torch.manual_seed(0)
        s = trainer.setup(tiny_cfg(**settings))
        models = [m for m in (s.student, s.teacher, s.reference) if m is not None]
        assert all(heads.has_output_head(m) for m in models)  # the once-per-model check runs its head: not counted
        if not via_heads:
            _logits_only(monkeypatch)
        heads_run = [_count_calls(m.lm_head) for m in models]
        grads = []  # the gradients the optimiser steps on (Adam's first step would amplify float noise near 0)
        s.optimizer.register_step_pre_hook(lambda *_: grads.extend(p.grad.clone() for p in s.student.parameters()))
        problems = [s.train_set.problems[i] for i in s.schedule.batch(1)]
        plan, seen = trainer.step_plan(s, len(problems))
        rollouts = trainer.sample_rollouts(s, problems, observe=seen)
        sampler_calls = heads_run[0][0]
        rollouts.scores = [float(i % 3 == 0) for i in range(len(rollouts.texts))]  # outcome advantages not all 0
        scores = trainer.score_rollouts(s, rollouts.batch, heads=plan, seen=seen)
        targets = trainer.rollout_targets(s, rollouts, rollouts.batch, scores.reads)
        metrics = trainer.update_student(s, rollouts.batch, targets, scores)
        head_calls = heads_run[0][0] - sampler_calls + sum(c[0] for c in heads_run[1:])
        results.append((metrics, grads, head_calls))
    (m_heads, g_heads, calls_heads), (m_logits, g_logits, calls_logits) = results
    assert calls_heads == 0 and calls_logits > 0
    for key in m_logits:
        assert m_heads[key] == pytest.approx(m_logits[key], rel=1e-4, abs=1e-6), key
    assert m_heads["actor/grad_norm"] > 0 and len(g_heads) == len(g_logits) > 0
    for a, b in zip(g_heads, g_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
