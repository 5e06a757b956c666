"""One training step of the local engine on tiny CPU models: the update moves the student the right way.

The direction tests use a teacher and a student with one ranking of tokens but different sharpness (the student is
the teacher with a softer output layer), so the teacher's argmax is inside every top-k support and OPD must raise
the student's log-prob of it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from opd.engines.local import trainer
from opd.engines.local.rollout import collate
from opd.engines.local.scoring import response_logits
from opd.models import VocabularyMismatchError


@pytest.fixture(scope="module")
def sharp_pair(toy_world):
    """(student dir, teacher dir): same weights, the teacher's final norm 4x the student's (sharper, same order)."""
    from opd.toy import build_tiny_model, save_model

    tok = toy_world["tokenizer"]
    root = toy_world["root"]
    teacher = build_tiny_model(tok, size="tiny", seed=3)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(12.0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.model.norm.weight.div_(4.0)
    return save_model(student, tok, root / "soft_student"), save_model(teacher, tok, root / "sharp_teacher")


def one_step(cfg, monkeypatch):
    """setup + one train_step; returns (session, rollouts, student before the step, metrics)."""
    captured = {}
    real_generate = trainer.generate

    def spy(*args, **kwargs):
        captured["rollouts"] = real_generate(*args, **kwargs)
        return captured["rollouts"]

    monkeypatch.setattr(trainer, "generate", spy)
    session = trainer.setup(cfg)
    before = copy.deepcopy(session.student).eval()
    metrics = trainer.train_step(session, 1)
    return session, captured["rollouts"], before, metrics


def _masked_mean(x_NT, mask_NT):
    return float((x_NT * mask_NT).sum() / mask_NT.sum())


@pytest.mark.parametrize(
    "settings",
    [
        {"algo.top_k": 4, "algo.top_k_strategy": "only_stu"},
        {"algo.top_k": 4, "algo.top_k_strategy": "only_tch", "algo.reward_weight_mode": "teacher_p"},
        {"algo.top_k": 4, "algo.top_k_strategy": "intersection", "algo.reward_weight_mode": "none"},
        {"algo.top_k": 4, "algo.top_k_strategy": "union"},
        {"algo.top_k": -1},
        {"algo.top_k": 4, "algo.tail_bucket": True},
    ],
    ids=["only_stu", "only_tch-teacher_p", "intersection-none", "union", "full_vocab", "tail_bucket"],
)
def test_opd_step_raises_student_logprob_of_teacher_argmax(sharp_pair, tiny_cfg, monkeypatch, settings):
    student_dir, teacher_dir = sharp_pair
    cfg = tiny_cfg(actor_model_path=student_dir, reward_model_path=teacher_dir, lr=3e-3, weight_decay=0.0, **settings)
    s, rollouts, before, metrics = one_step(cfg, monkeypatch)
    batch = rollouts.batch
    with torch.no_grad():
        target = response_logits(s.teacher, batch).argmax(-1, keepdim=True)
        lp_before = torch.log_softmax(response_logits(before, batch), -1).gather(-1, target)[..., 0]
        lp_after = torch.log_softmax(response_logits(s.student.eval(), batch), -1).gather(-1, target)[..., 0]
    mask = batch.response_mask_NT
    assert _masked_mean(lp_after, mask) > _masked_mean(lp_before, mask) + 1e-3
    assert metrics["opd/reverse_kl"] > 0 and metrics["actor/skipped_step"] == 0.0


@pytest.mark.parametrize("top_k", [4, 0, -1])
def test_opd_loss_is_zero_when_student_is_teacher(toy_world, tiny_cfg, monkeypatch, top_k):
    cfg = tiny_cfg(reward_model_path=toy_world["student"], weight_decay=0.0, **{"algo.top_k": top_k})
    # both reads from the same full forward: exactly 0 (the sampler's KV-cached logits differ by float noise, which
    # AdamW would turn into a step of size lr; test_sampler_reads_equal_a_separate_pass covers that path)
    monkeypatch.setattr(trainer, "student_reads_suffice", lambda *args: False)
    s, _, before, metrics = one_step(cfg, monkeypatch)
    assert abs(metrics["actor/loss"]) < 1e-7
    assert metrics["actor/grad_norm"] < 1e-7
    assert abs(metrics["opd/reverse_kl"]) < 1e-6
    for (name, p_before), p_after in zip(before.named_parameters(), s.student.parameters()):
        assert torch.equal(p_before, p_after), name


def test_grpo_step_favours_rewarded_samples(tiny_cfg, monkeypatch):
    """Rule reward replaced by 'the first response token is even': rewarded samples must gain log-likelihood."""

    real_generate = trainer.generate

    def generate_with_parity(model, tokenizer, *args, **kwargs):
        out = real_generate(model, tokenizer, *args, **kwargs)
        first = out.batch.response_ids_NT[:, 0]
        out.scores = [float(int(t) % 2 == 0) for t in first]
        return out

    cfg = tiny_cfg(n_responses=4, lr=1e-3, weight_decay=0.0, **{"ADV_ESTIMATOR": "grpo", "LOG_PROB_TOP_K": "0"})
    captured = {}

    def spy(*args, **kwargs):
        captured["r"] = generate_with_parity(*args, **kwargs)
        return captured["r"]

    monkeypatch.setattr(trainer, "generate", spy)
    s = trainer.setup(cfg)
    assert s.teacher is None
    before = copy.deepcopy(s.student).eval()
    metrics = trainer.train_step(s, 1)
    batch, scores = captured["r"].batch, torch.tensor(captured["r"].scores)
    assert 0 < float(scores.mean()) < 1 and metrics["train/true_reward"] == pytest.approx(float(scores.mean()))
    ids = batch.response_ids_NT[..., None]
    with torch.no_grad():
        seq_before = (
            torch.log_softmax(response_logits(before, batch), -1).gather(-1, ids)[..., 0] * batch.response_mask_NT
        ).sum(-1)
        seq_after = (
            torch.log_softmax(response_logits(s.student.eval(), batch), -1).gather(-1, ids)[..., 0]
            * batch.response_mask_NT
        ).sum(-1)
    delta = seq_after - seq_before
    assert float(delta[scores == 1].mean()) > float(delta[scores == 0].mean())


def test_vocabulary_mismatch_fails_before_any_compute(toy_world, tiny_cfg, tmp_path, monkeypatch):
    from opd.toy import build_tiny_model, build_toy_tokenizer, save_model

    other_tok = build_toy_tokenizer(vocab_size=120)  # fewer BPE merges: a different vocabulary
    assert other_tok.get_vocab() != toy_world["tokenizer"].get_vocab()
    other = save_model(build_tiny_model(other_tok, size="tiny", seed=0), other_tok, tmp_path / "other_teacher")

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded data or weights before checking the vocabularies")

    monkeypatch.setattr(trainer, "load_causal_lm", must_not_run)
    monkeypatch.setattr(trainer, "load_pair", must_not_run)
    monkeypatch.setattr(trainer, "load_prompt_set", must_not_run)
    with pytest.raises(VocabularyMismatchError, match="do not share a vocabulary"):
        trainer.train(tiny_cfg(reward_model_path=other))


def test_teacher_with_padded_output_layer_is_read_at_the_common_width(toy_world, tiny_cfg, tmp_path, monkeypatch):
    from opd.toy import build_tiny_model, save_model

    tok = toy_world["tokenizer"]
    teacher = build_tiny_model(tok, size="tiny", seed=5)
    teacher.resize_token_embeddings(len(tok) + 8)
    padded = save_model(teacher, tok, tmp_path / "padded_teacher")
    s, _, _, metrics = one_step(tiny_cfg(reward_model_path=padded), monkeypatch)
    assert s.vocab_width == len(tok)
    assert metrics["actor/grad_norm"] > 0


def test_response_logits_match_an_unpadded_forward(toy_world):
    """Left-padded prompts + right-padded responses give each row exactly its own unpadded logits."""
    from opd.toy import build_tiny_model

    model = build_tiny_model(toy_world["tokenizer"], size="tiny", seed=4).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    responses = [[20, 21], [22, 23, 24, 25], [26]]
    batch = collate(prompts, responses, [0, 1, 2], pad_id=0)
    with torch.no_grad():
        logits = response_logits(model, batch)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            alone = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) + len(r) - 1]
            torch.testing.assert_close(logits[i, : len(r)], alone, rtol=1e-4, atol=1e-5)
            sub = batch.rows(i, i + 1)  # trimmed micro-batch of one row: same logits
            torch.testing.assert_close(response_logits(model, sub)[0, : len(r)], alone, rtol=1e-4, atol=1e-5)
    assert batch.response_mask_NT.sum(-1).tolist() == [2.0, 4.0, 1.0]


def test_processed_sampling_is_flagged_as_biased(tiny_cfg, capsys):
    from opd.engines.local.config import sampling_bias_warnings

    assert sampling_bias_warnings(tiny_cfg()) == []
    warnings = sampling_bias_warnings(tiny_cfg(TOP_P="0.9", REPETITION_PENALTY="1.1"))
    assert len(warnings) == 2 and "TOP_P=0.9 < 1" in warnings[0] and "REPETITION_PENALTY=1.1" in warnings[1]
    trainer.train(tiny_cfg(total_steps=1, TOP_P="0.9"))
    assert "opd train: warning: TOP_P=0.9 < 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings", [{"algo.top_k": 4}, {"algo.top_k": 0}, {"ADV_ESTIMATOR": "grpo", "LOG_PROB_TOP_K": "0"}]
)
def test_sampler_reads_equal_a_separate_pass(tiny_cfg, settings):
    """The student's reads recorded from the sampler's own logits equal a separate no-grad pass over the batch."""
    from opd.engines.local.scoring import SamplerReads, score

    s = trainer.setup(tiny_cfg(n_responses=3, repetition_penalty=1.3, top_p=0.9, **settings))
    problems = [s.train_set.problems[i] for i in s.schedule.batch(1)]
    seen = SamplerReads(s.cfg.algo, len(problems) * 3, s.cfg.max_resp_length, s.vocab_width)
    batch = trainer.sample_rollouts(s, problems, observe=seen).batch
    T = batch.response_ids_NT.shape[1]
    mask = batch.response_mask_NT > 0
    alone = score(s.student, None, batch, s.cfg.algo, token_budget=10**6, vocab_size=s.vocab_width).student
    got = seen.stats(T)
    for name in ("lp_NT", "entropy_NT", "topk_lp_NTK"):
        want = getattr(alone, name)
        torch.testing.assert_close(getattr(got, name)[mask], want[mask], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(got.topk_ids_NTK[mask], alone.topk_ids_NTK[mask])
    assert float(alone.lp_NT[mask].abs().sum()) > 0  # real log-probs were compared


def test_buffered_sampler_reads_equal_reads_per_position(tiny_cfg, monkeypatch):
    """SamplerReads reads its buffered positions in one call: the same values as one call per position (the reads
    are row-wise), over several sampler batches and with rows finishing early."""
    from opd.engines.local.scoring import SamplerReads

    s = trainer.setup(tiny_cfg(n_responses=3, rollout_batch_size=5, **{"algo.top_k": 4}))
    problems = [s.train_set.problems[i] for i in s.schedule.batch(1)]
    results = []
    vocab = s.vocab_width or s.student.config.vocab_size
    for budget in (SamplerReads.BUFFER_ELEMENTS, 1, 3 * 5 * vocab):  # all, one position, three at a time
        monkeypatch.setattr(SamplerReads, "BUFFER_ELEMENTS", budget)
        s.generator.manual_seed(0)
        seen = SamplerReads(s.cfg.algo, len(problems) * 3, s.cfg.max_resp_length, s.vocab_width)
        batch = trainer.sample_rollouts(s, problems, observe=seen).batch
        results.append((batch, seen.stats(batch.response_ids_NT.shape[1])))
    (batch, want), *others = results
    assert batch.n_rows > 5  # several sampler batches
    mask = batch.response_mask_NT > 0
    for other_batch, got in others:
        assert torch.equal(other_batch.response_ids_NT, batch.response_ids_NT)
        for name in ("lp_NT", "entropy_NT", "topk_lp_NTK", "topk_ids_NTK"):
            assert torch.equal(getattr(got, name)[mask], getattr(want, name)[mask]), name


def test_rollouts_graded_in_the_background_equal_grading_in_place(tiny_cfg, monkeypatch):
    """`generate` grades in a background thread: the scores and answers are those of grade_batch on the texts, an
    error of the grader surfaces where the scores are read, and a replaced reward sticks."""
    from opd.engines.local import rollout
    from opd.grading import grade_batch

    s = trainer.setup(tiny_cfg(n_responses=2))
    problems = [s.train_set.problems[i] for i in s.schedule.batch(1)]
    out = trainer.sample_rollouts(s, problems)
    truths = [problems[g].ground_truth for g in out.batch.group_index_N.tolist()]
    want = grade_batch(out.texts, truths)
    assert out.scores == [g.score for g in want] and out.extracted == [g.extracted for g in want]
    out.scores = [1.0] * len(out.texts)
    assert out.scores == [1.0] * len(out.texts)

    def broken(*args, **kwargs):
        raise RuntimeError("grader broke")

    monkeypatch.setattr(rollout, "grade_batch", broken)
    failing = trainer.sample_rollouts(s, problems)
    with pytest.raises(RuntimeError, match="grader broke"):
        failing.scores


@pytest.mark.parametrize("compiled", [False, True])
def test_compile_sampler_reaches_the_sampler(tiny_cfg, monkeypatch, compiled):
    """TrainConfig.compile_sampler is what the step's sampler is called with (off by default: eager, bit-exact)."""
    from opd.engines.local import rollout

    calls = []
    real_sample = rollout.sample

    def spy(*args, **kwargs):
        calls.append(kwargs["compile"])
        return real_sample(*args, **{**kwargs, "compile": False})  # the compiled path is tested in test_generation

    monkeypatch.setattr(rollout, "sample", spy)
    cfg = tiny_cfg(compile_sampler=True) if compiled else tiny_cfg()
    assert cfg.compile_sampler is compiled
    trainer.train_step(trainer.setup(cfg), 1)
    assert calls == [compiled]


def test_profiles_are_computed_and_logged_on_the_same_steps(tiny_cfg):
    """The per-position profile is computed only on the steps whose profile is logged (first, last, every
    PROFILE_FREQ): profiles.jsonl holds exactly those steps, each with its profile."""
    import json

    cfg = tiny_cfg(total_steps=5, profile_freq=2)
    run_dir = trainer.train(cfg)
    lines = [json.loads(line) for line in (run_dir / "profiles.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 4, 5]
    assert all(len(line) > 1 for line in lines)  # a real profile besides the step
    s = trainer.setup(tiny_cfg(total_steps=5, profile_freq=0, run_name="again"))
    due = [step for step in range(1, 6) if trainer.train_step(s, step) is not None and s.last_profile]
    assert due == [1, 5]
