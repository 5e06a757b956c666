"""verl's own ``main_ppo`` in the OPD trainer mode (``trainer.v1.trainer_mode=opd``) on the CPU, end to end.

Two runs on tiny Qwen2s (4 prompts x 4 samples, 16 response tokens, K = 16, only_stu, the teacher in its own
worker group on a second logical GPU):
- a teacher that ranks tokens as the student does but is sharper (the student's weights, final norm x4): over two
  steps the OPD loss falls (|actor/pg_loss|, the surrogate -sum of advantages, and the per-token reverse KL), the
  student's log-prob of the teacher's argmax rises (``opd/student_lp_at_teacher_top1``), and the run's metrics hold
  the dynamics keys of the local engine;
- the teacher equal to the student: every advantage is 0 within 1e-6 (the two reads are the same computation in
  two worker groups, so this also checks that the rows of the packed reads line up).
Ray, its loopback-only set-up and the session kill are those of the GRPO test (same helpers).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

if os.environ.get("CI", "").lower() in ("1", "true"):  # CI installs the verl extra: a broken install must fail
    import verl  # noqa: F401
else:
    pytest.importorskip("verl")

pytestmark = pytest.mark.slow


def _grpo_test_module():
    """The GRPO test's command and process helpers (one definition of the CPU main_ppo set-up)."""
    path = Path(__file__).with_name("test_verl_grpo_on_cpu.py")
    spec = importlib.util.spec_from_file_location("_verl_grpo_on_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GRPO = _grpo_test_module()
DYNAMICS_KEYS = ("opd/overlap_ratio", "opd/overlap_mass_student", "opd/overlap_mass_teacher", "opd/top1_agreement",
                 "opd/entropy/student", "opd/entropy/teacher", "opd/entropy/gap", "opd/reverse_kl",
                 "opd/advantage_mean", "opd/candidates/valid", "opd/student_lp_at_teacher_top1")


def with_overrides(args: list[str], *changes: str) -> list[str]:
    """`args` with each ``key=value`` of `changes` replacing the same key (or appended); a bare ``~key`` drops it."""
    def key(arg: str) -> str:
        return arg.split("=", 1)[0].lstrip("+~")

    drop = {key(c) for c in changes}
    return [a for a in args if key(a) not in drop] + [c for c in changes if "=" in c]


def opd_overrides(assets: dict, teacher: str, out_dir: str, ray_tmp: str, steps: int) -> list[str]:
    return with_overrides(
        GRPO.grpo_overrides(assets, out_dir, ray_tmp),
        "~actor_rollout_ref.actor.entropy_coeff",  # not part of the OPD loss
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",  # 2 micro-batches of the 16-row mini-batch
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        f"trainer.total_training_steps={steps}", "trainer.experiment_name=cpu_opd",
        "+ray_kwargs.ray_init.num_gpus=2",  # one logical GPU for the actor, one for the teacher's pool
        "trainer.v1.trainer_mode=opd", "+opd.top_k=16", "+opd.top_k_strategy=only_stu",
        f"+opd.teacher.path={teacher}")


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


def run_opd(assets: dict, teacher: str, tmp_path: Path, steps: int) -> dict[int, dict]:
    env = {**os.environ, **GRPO.ENV, "VERL_FILE_LOGGER_PATH": str(tmp_path / "metrics.jsonl")}
    env.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="opdray_", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    log_path = tmp_path / "main_ppo.log"
    try:
        rc, wall = GRPO.run_main_ppo(opd_overrides(assets, teacher, str(tmp_path), ray_tmp, steps), env,
                                     str(tmp_path), str(log_path), GRPO.RUN_TIMEOUT_S)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = log_path.read_text(errors="replace")
    assert rc == 0, f"main_ppo exited {rc} after {wall:.0f} s; log tail:\n{log[-6000:]}"
    assert "[opd] verl plugin registration failed" not in log
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    steps_logged = {rec["step"]: rec["data"] for rec in map(json.loads, lines)}
    assert sorted(steps_logged) == list(range(1, steps + 1)), f"steps logged: {sorted(steps_logged)}"
    timing = {s: round(m["timing_s/step"], 2) for s, m in steps_logged.items()}
    print(f"\nmain_ppo (OPD) wall {wall:.1f} s; step times {timing} s")
    return steps_logged


def test_opd_trainer_mode_learns_from_a_sharper_teacher(verl_assets, sharp_teacher, tmp_path):
    steps = run_opd(verl_assets, sharp_teacher, tmp_path, steps=2)
    for step, m in steps.items():
        missing = [k for k in DYNAMICS_KEYS if k not in m]
        assert not missing, f"step {step}: dynamics keys missing: {missing}"
        assert m["training/rollout_probs_diff_max"] < 1e-6  # the rollout samples what the trainer scores
        assert m["actor/grad_norm"] > 0 and m["opd/candidates/valid"] == 16
    first, second = steps[1], steps[2]
    print({k: (first[k], second[k]) for k in ("actor/pg_loss", "opd/reverse_kl", "opd/student_lp_at_teacher_top1")})
    assert abs(second["actor/pg_loss"]) < abs(first["actor/pg_loss"])
    assert second["opd/reverse_kl"] < first["opd/reverse_kl"]
    assert second["opd/student_lp_at_teacher_top1"] > first["opd/student_lp_at_teacher_top1"]


def test_opd_advantages_vanish_when_the_teacher_is_the_student(verl_assets, tmp_path):
    m = run_opd(verl_assets, verl_assets["model"], tmp_path, steps=1)[1]
    for key in ("opd/max_adv/A", "opd/min_adv/A", "opd/advantage_mean", "opd/reverse_kl", "actor/pg_loss"):
        assert abs(m[key]) < 1e-6, (key, m[key])
    assert m["opd/overlap_ratio"] == 1.0 and m["opd/top1_agreement"] == 1.0
