"""Run outputs and equivalences of the local engine on tiny CPU models: resume reproduces an uninterrupted run,
micro-batching leaves the gradient unchanged, every estimator / loss option runs a step, validation metrics."""

from __future__ import annotations

import json

import pytest
import torch

from opd.core.step import build_targets
from opd.engines.local import trainer
from opd.engines.local.checkpoint import latest_checkpoint
from opd.engines.local.data import PromptSchedule
from opd.engines.local.logging import read_metrics
from opd.engines.local.rollout import micro_batch_bounds
from opd.engines.local.scoring import score
from opd.engines.local.update import loss_and_backward
from opd.engines.local.validation import summarise
from opd.eval.metrics import majority_score


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def test_resume_reproduces_the_uninterrupted_run(tiny_cfg, tmp_path, monkeypatch, capsys):
    settings = dict(
        total_steps=4,
        save_freq=2,
        test_freq=2,
        val_before_train=True,
        lr_scheduler="cosine",
        warmup_ratio=0.25,
        **{"algo.top_k": 4},
    )
    straight = trainer.train(tiny_cfg(output_dir=str(tmp_path / "a"), **settings))

    # the same run, killed in the middle of step 3 (after its rollouts consumed random numbers), then resumed
    real_score, calls = trainer.score, {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_score(*args, **kwargs)

    monkeypatch.setattr(trainer, "score", crash_on_third)
    cfg = tiny_cfg(output_dir=str(tmp_path / "b"), **settings)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg)
    assert latest_checkpoint(tmp_path / "b" / "t").name == "step_000002"
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "t")] == [0, 1, 2]
    monkeypatch.setattr(trainer, "score", real_score)
    resumed = trainer.train(cfg)
    assert "changed settings" not in capsys.readouterr().err

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert _without_timings(a) == _without_timings(b)
    assert "val/mean@2" in a[-1] and "actor/lr" in a[-1]
    spec_keys = [
        "opd/overlap_ratio",
        "opd/overlap_mass_student",
        "opd/overlap_mass_teacher",
        "opd/top1_agreement",
        "opd/overlap_token_advantage",
        "opd/student_only_advantage",
        "opd/entropy/student",
        "opd/entropy/teacher",
        "opd/entropy/gap",
        "opd/max_adv/A",
        "opd/max_adv/p_minus_q",
        "opd/min_adv/q",
        "opd/reverse_kl",
        "opd/candidates/overlap",
        "opd/pos/0-255/overlap_ratio",
        "actor/grad_norm",
        "actor/loss",
        "train/true_reward",
        "train/response_length",
    ]
    assert [k for k in spec_keys if k not in a[1]] == []
    assert not any(k.startswith("val") for k in a[1])  # training diagnostics never carry a val prefix
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    for name in ("config.yaml", "metrics.jsonl", "profiles.jsonl", "samples.jsonl"):
        assert (resumed / name).is_file()
    samples = [json.loads(line) for line in (resumed / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [1, 1, 2, 2, 3, 3, 4, 4]  # the crashed tail was dropped and redone
    assert samples == [json.loads(line) for line in (straight / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "response", "score", "ground_truth"} <= set(samples[0])
    assert any((resumed / "tensorboard").iterdir())
    ckpt = resumed / "checkpoints" / "step_000004"
    assert {"model", "optimizer.pt", "rng.pt", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4


def test_unfinished_checkpoint_folder_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_000002").mkdir(parents=True)
    (root / "step_000002" / "trainer_state.json").write_text("{}")
    (root / ".tmp-step_000004").mkdir()
    (root / "step_000006").mkdir()  # no trainer_state.json: never finished
    assert latest_checkpoint(tmp_path).name == "step_000002"


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "agg, top_k, estimator",
    [
        ("token-mean", 4, "token_reward_direct"),
        ("seq-mean-token-mean", 4, "token_reward_direct"),
        ("seq-mean-token-sum-norm", 4, "token_reward_direct"),
        ("seq-mean-token-sum", 4, "token_reward_direct_plus_grpo"),
        ("token-mean", -1, "token_reward_direct_plus_grpo"),
        ("token-mean", 0, "token_grpo"),
    ],
)
def test_micro_batching_does_not_change_the_gradient(tiny_cfg, agg, top_k, estimator):
    cfg = tiny_cfg(
        **{"algo.top_k": top_k, "algo.loss_agg_mode": agg, "algo.use_kl": True, "algo.adv_estimator": estimator}
    )
    s = trainer.setup(cfg)
    problems = [s.train_set.problems[i] for i in s.schedule.batch(1)]
    rollouts = trainer.generate(
        s.student,
        s.tokenizer,
        [p.prompt_ids for p in problems],
        [p.ground_truth for p in problems],
        n=2,
        max_new_tokens=12,
        temperature=1.0,
        top_p=1.0,
        repetition_penalty=1.0,
        generator=s.generator,
        batch_size=64,
        eos_ids=s.eos_ids,
        pad_id=s.pad_id,
    )
    batch = rollouts.batch
    reads = score(s.student, s.teacher, batch, cfg.algo, token_budget=10**6)
    outcome = (torch.arange(batch.n_rows) % 3 == 0).float()  # mixed rule rewards within groups
    targets = build_targets(
        cfg.algo,
        reads,
        response_ids_NT=batch.response_ids_NT,
        response_mask_NT=batch.response_mask_NT,
        group_index_N=batch.group_index_N,
        outcome_scores_N=outcome,
        has_box_N=torch.ones(batch.n_rows, dtype=torch.bool),
    )
    targets.ref_lp_NTC = targets.old_lp_NTC - 0.1  # any constant reference exercises the KL term
    grads = {}
    for budget in (10**6, 1):  # whole batch in one pass vs one row per micro-batch
        assert len(micro_batch_bounds(batch, budget)) == (1 if budget > 1 else batch.n_rows)
        s.student.zero_grad(set_to_none=True)
        out = loss_and_backward(
            s.student, batch, targets, cfg.algo, token_budget=budget, norm_length=12, teacher=s.teacher
        )
        grads[budget] = (out["actor/loss"], _grads(s.student))
    assert sum(float(g.abs().sum()) for g in grads[1][1]) > 1e-6  # a non-trivial gradient is compared
    assert grads[1][0] == pytest.approx(grads[10**6][0], rel=1e-5, abs=1e-7)
    for g_one, g_all in zip(grads[1][1], grads[10**6][1]):
        torch.testing.assert_close(g_one, g_all, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "settings",
    [
        {"ADV_ESTIMATOR": "token_reward_direct", "LOG_PROB_TOP_K": "0"},
        {"ADV_ESTIMATOR": "token_reward_direct_plus_grpo", "LOG_PROB_TOP_K": "4"},
        {"ADV_ESTIMATOR": "token_reward_direct_plus_grpo", "LOG_PROB_TOP_K": "0"},
        {"ADV_ESTIMATOR": "token_reward_direct_plus_grpo", "LOG_PROB_TOP_K": "-1"},
        {"ADV_ESTIMATOR": "token_grpo", "LOG_PROB_TOP_K": "0"},
        {"TOP_K_STRATEGY": "union-intersection", "REWARD_WEIGHT_MODE": "teacher_p"},
        {"USE_KL": "True", "LOG_PROB_TOP_K": "4"},
        {"USE_KL": "True", "LOG_PROB_TOP_K": "0"},
        {"LOSS_AGG_MODE": "seq-mean-token-sum", "algo.teachability": "weight"},
        {"LR_SCHEDULER": "cosine", "TEACHER_TEMPERATURE": "2.0", "TEMPERATURE": "0.8"},
        {"TEACHER_DTYPE": "bf16", "GRADIENT_CHECKPOINTING": "True", "MICRO_BATCH_TOKENS": "40"},
    ],
)
def test_every_estimator_and_option_runs_a_step(tiny_cfg, monkeypatch, settings):
    s = trainer.setup(tiny_cfg(**settings))
    before = [p.detach().clone() for p in s.student.parameters()]
    metrics = trainer.train_step(s, 1)
    assert all(v == v for v in metrics.values()), "NaN in metrics"
    assert metrics["actor/grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, s.student.parameters()))
    assert "train/true_reward" in metrics and "opd/reverse_kl" in metrics
    assert not any(k.startswith("val") for k in metrics), "training diagnostics must not use a val prefix"
    if "algo.teachability" in settings:
        assert 0.0 <= metrics["opd/teachability_weight"] <= 1.0


def test_format_reward_masks_responses_without_a_box(tiny_cfg):
    """With ENABLE_FORMAT_REWARD a response without \\boxed leaves the loss (its row of the mask is 0) and one with
    it stays; when none has it the step updates nothing. The texts are set here: a random tiny student may write
    any token, \\boxed included. (train/format_ok counts any final answer found, boxed or not: not this rule.)"""
    s = trainer.setup(tiny_cfg(ENABLE_FORMAT_REWARD="True", weight_decay=0.0))
    problems = [s.train_set.problems[i] for i in s.schedule.batch(1)]
    heads, seen = trainer.step_plan(s, len(problems))
    rollouts = trainer.sample_rollouts(s, problems, observe=seen)
    batch = rollouts.batch
    scores = trainer.score_rollouts(s, batch, heads=heads, seen=seen)
    unboxed = [text.replace("\\boxed", "") for text in rollouts.texts]

    rollouts.texts = ["\\boxed{7}"] + unboxed[1:]
    kept = trainer.rollout_targets(s, rollouts, batch, scores.reads).response_mask_NT.sum(-1) > 0
    assert kept.tolist() == [True] + [False] * (len(unboxed) - 1)  # every response has >= 1 token (EOS counts)

    rollouts.texts = unboxed
    targets = trainer.rollout_targets(s, rollouts, batch, scores.reads)
    assert not targets.response_mask_NT.any()
    metrics = trainer.update_student(s, batch, targets, scores)
    assert metrics["actor/grad_norm"] == 0.0 and metrics["actor/loss"] == 0.0


def test_validation_metrics_per_source():
    per_problem = [
        ("aime", [1.0, 0.0, 0.0, 0.0], ["5", "7", "7", None], [3, 3, 3, 3]),
        ("aime", [0.0, 0.0, 0.0, 0.0], [None, None, None, None], [1, 1, 1, 1]),
        ("amc", [1.0, 1.0, 0.0, 1.0], ["2", "2", "3", "2"], [2, 4, 2, 4]),
    ]
    out = summarise(4, per_problem)
    assert out["val/aime/mean@4"] == pytest.approx((0.25 + 0.0) / 2)
    assert out["val/aime/best@4"] == pytest.approx(0.5)
    assert out["val/aime/maj@4"] == pytest.approx(0.0)  # majority "7" is wrong; no-answer rows do not vote
    assert out["val/amc/mean@4"] == pytest.approx(0.75) and out["val/amc/maj@4"] == 1.0
    assert out["val/amc/response_length"] == pytest.approx(3.0)
    assert out["val/mean@4"] == pytest.approx((0.25 + 0.0 + 0.75) / 3)
    assert majority_score(["1", "2"], [0.0, 1.0]) == 0.0  # tie: the answer seen first


def test_prompt_schedule_is_a_pure_function_of_seed_and_step():
    sched = PromptSchedule(10, 3, seed=7, total_epochs=2, total_steps=None)
    assert sched.steps_per_epoch == 3 and sched.total_steps == 6
    epoch0 = [i for step in (1, 2, 3) for i in sched.batch(step)]
    assert len(set(epoch0)) == 9  # no repeats within an epoch (one prompt left over)
    assert sched.batch(4) != sched.batch(1)
    again = PromptSchedule(10, 3, seed=7, total_epochs=2, total_steps=4)
    assert [again.batch(s) for s in range(1, 5)] == [sched.batch(s) for s in range(1, 5)] and again.total_steps == 4
    assert sched.position(4) == {"epoch": 1, "batch_in_epoch": 0}
    with pytest.raises(ValueError, match="fewer than MINI_BATCH_SIZE"):
        PromptSchedule(2, 3, seed=0, total_epochs=1, total_steps=None)


def test_resuming_with_changed_settings_warns(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(total_steps=1, save_freq=1, output_dir=str(tmp_path))
    trainer.train(cfg)
    trainer.train(cfg.replace(total_steps=2, lr=5e-4))
    err = capsys.readouterr().err
    assert "changed settings" in err and "lr: 0.001 -> 0.0005" in err and "total_steps: 1 -> 2" in err
    assert [r["step"] for r in read_metrics(tmp_path / "t")] == [1, 2]


def test_starting_over_beside_old_checkpoints_is_refused(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(total_steps=1, save_freq=1, output_dir=str(tmp_path))
    trainer.train(cfg)
    # RESUME=off next to step_000001 would let a later RESUME=auto continue the wrong run
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .step_000001. and RESUME=off"):
        trainer.train(cfg.replace(resume="off"))
    # without checkpoints, starting over replaces the metrics and the TensorBoard events
    cfg = tiny_cfg(total_steps=1, save_freq=0, output_dir=str(tmp_path / "nockpt"))
    run = trainer.train(cfg)
    (run / "tensorboard" / "stale.marker").write_text("x")
    trainer.train(cfg.replace(resume="off"))
    assert "starting over" in capsys.readouterr().err
    assert not (run / "tensorboard" / "stale.marker").exists()
    assert [r["step"] for r in read_metrics(run)] == [1]


def test_resaving_a_step_replaces_it_whole(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd.engines.local.checkpoint import save_checkpoint
    from opd.toy import build_toy_tokenizer

    tok = build_toy_tokenizer()
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    for position in ({"epoch": 0, "index": 1}, {"epoch": 0, "index": 2}):
        path = save_checkpoint(
            tmp_path,
            1,
            model=model,
            tokenizer=tok,
            optimizer=opt,
            scheduler=sched,
            generator=gen,
            data_position=position,
        )
    assert json.loads((path / "trainer_state.json").read_text())["data_position"] == {"epoch": 0, "index": 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
