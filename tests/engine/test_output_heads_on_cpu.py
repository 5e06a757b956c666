"""The full-vocabulary update from output heads (no [T, V] logits, one teacher forward per step) equals the logits
path on the same session, and a model whose logits are not its head at its last hidden state falls back."""

from __future__ import annotations

import pytest
import torch

from opd.engines.local import heads, trainer


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
            monkeypatch.setattr(trainer, "use_output_heads", lambda *a: False)
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
