"""verl's own ``main_ppo`` in the OPD trainer mode (``trainer.v1.trainer_mode=opd``) on the CPU, end to end.

Three runs on tiny Qwen2s (4 prompts x 4 samples, 16 response tokens, the teacher in its own worker group on a
second logical GPU); the first two with K = 16, only_stu:
- a teacher that ranks tokens as the student does but is sharper (the student's weights, final norm x4): over two
  steps the OPD loss falls (|actor/pg_loss|, the surrogate -sum of the top-16 advantages), the
  student's log-prob of the teacher's argmax rises (``opd/student_lp_at_teacher_top1``), and the run's metrics hold
  the dynamics keys of the local engine;
- the teacher equal to the student: every advantage is 0 within 1e-6 (the two reads are the same computation in
  two worker groups, so this also checks that the rows of the packed reads line up);
- the full vocabulary (K = -1) with the KL-to-reference term (USE_KL), the sharper teacher, two steps.
All run `ENGINE=verl bash on_policy_distillation.sh`; Ray's loopback-only set-up and the session kill: conftest.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("CI", "").lower() in ("1", "true"):  # CI installs the verl extra: a broken install must fail
    import verl  # noqa: F401
else:
    pytest.importorskip("verl")

pytestmark = pytest.mark.slow


DYNAMICS_KEYS = (
    "opd/overlap_ratio",
    "opd/overlap_mass_student",
    "opd/overlap_mass_teacher",
    "opd/top1_agreement",
    "opd/entropy/student",
    "opd/entropy/teacher",
    "opd/entropy/gap",
    "opd/reverse_kl",
    "opd/advantage_mean",
    "opd/candidates/valid",
    "opd/student_lp_at_teacher_top1",
)


@pytest.fixture(scope="module")
def sharp_teacher(verl_assets):
    """The student's weights with the final norm x4: same token ranking, sharper (the teacher's argmax is inside
    every student top-16, so OPD must raise the student's log-prob of it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(verl_assets["root"]) / "sharp_teacher"
    model = AutoModelForCausalLM.from_pretrained(verl_assets["model"], dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(verl_assets["model"]).save_pretrained(out)
    return str(out)


def run_opd(run_launcher, knobs, teacher: str, name: str, steps: int, top_k: int = 16, **extra) -> dict[int, dict]:
    """OPD through the launcher: K = 16, only_stu (or `top_k`), the teacher in its own pool (a second logical GPU);
    `extra`: more launcher variables."""
    metrics, _, wall = run_launcher(
        "on_policy_distillation.sh",
        knobs(
            name,
            REWARD_MODEL_PATH=teacher,
            TOTAL_STEPS=str(steps),
            LOG_PROB_TOP_K=str(top_k),
            TOP_K_STRATEGY="only_stu",
            **extra,
        ),
    )
    assert sorted(metrics) == list(range(1, steps + 1)), f"steps logged: {sorted(metrics)}"
    timing = {s: round(m["timing_s/step"], 2) for s, m in metrics.items()}
    print(f"\non_policy_distillation.sh (ENGINE=verl) wall {wall:.1f} s; step times {timing} s")
    return metrics


def test_opd_trainer_mode_learns_from_a_sharper_teacher(run_launcher, knobs, sharp_teacher):
    steps = run_opd(run_launcher, knobs, sharp_teacher, "opd_sharp", steps=2)
    for step, m in steps.items():
        missing = [k for k in DYNAMICS_KEYS if k not in m]
        assert not missing, f"step {step}: dynamics keys missing: {missing}"
        assert m["training/rollout_probs_diff_max"] < 1e-6  # the rollout samples what the trainer scores
        assert m["actor/grad_norm"] > 0 and m["opd/candidates/valid"] == 16
    first, second = steps[1], steps[2]
    print({k: (first[k], second[k]) for k in ("actor/pg_loss", "opd/reverse_kl", "opd/student_lp_at_teacher_top1")})
    assert abs(second["actor/pg_loss"]) < abs(first["actor/pg_loss"])
    # not asserted: opd/reverse_kl, the k1 estimate lp - lq at the sampled token, is too noisy on 16 rollouts of 16
    # tokens to fall reliably in one step (measured through the launcher: 0.2984 -> 0.2986 while the top-16 loss fell)
    assert second["opd/student_lp_at_teacher_top1"] > first["opd/student_lp_at_teacher_top1"]


def test_opd_advantages_vanish_when_the_teacher_is_the_student(run_launcher, knobs, verl_assets):
    m = run_opd(run_launcher, knobs, verl_assets["model"], "opd_self", steps=1)[1]
    for key in ("opd/max_adv/A", "opd/min_adv/A", "opd/advantage_mean", "opd/reverse_kl", "actor/pg_loss"):
        assert abs(m[key]) < 1e-6, (key, m[key])
    assert m["opd/overlap_ratio"] == 1.0 and m["opd/top1_agreement"] == 1.0


def test_opd_full_vocabulary_and_kl_to_reference(run_launcher, knobs, sharp_teacher):
    """LOG_PROB_TOP_K=-1 with USE_KL=True, one run for both:
    - the full vocabulary: the teacher's final hidden states cross to the actor, which rebuilds the teacher's logits
      from its output embedding. The update's surrogate value (student_p: the exact KL, token-mean) equals the
      diagnostics' exact KL read in a separate pass, and the student's log-prob of the teacher's argmax rises;
    - USE_KL: the reference (the initial student, a second engine in the teacher's workers) scores the target
      slots; at step 1 it is the student (KL 0 within 1e-6: the rows line up), at step 2 the student has moved."""
    steps = run_opd(run_launcher, knobs, sharp_teacher, "opd_full_kl", steps=2, top_k=-1, USE_KL="True")
    keys = [k for k in DYNAMICS_KEYS if k != "opd/advantage_mean"]  # no slot advantages (as the local engine)
    for step, m in steps.items():
        added = ("actor/full_vocab_loss", "actor/kl_loss", "timing_s/opd_full_kl", "timing_s/opd_reference")
        missing = [k for k in (*keys, *added) if k not in m]
        assert not missing, f"step {step}: keys missing: {missing}"
        assert m["actor/grad_norm"] > 0 and m["opd/reverse_kl"] > 0.01
        assert m["actor/full_vocab_loss"] == pytest.approx(m["opd/reverse_kl"], rel=1e-4)
    first, second = steps[1], steps[2]
    watched = ("actor/full_vocab_loss", "actor/kl_loss", "opd/student_lp_at_teacher_top1")
    print({k: (first[k], second[k]) for k in watched})
    assert abs(first["actor/kl_loss"]) < 1e-6 < second["actor/kl_loss"]
    # not asserted: the exact KL of each step's fresh rollouts (measured 0.275 -> 0.298 in one run: other positions)
    assert second["opd/student_lp_at_teacher_top1"] > first["opd/student_lp_at_teacher_top1"]
