"""Every size, budget and seed of `opd lab`, in one validated object (`LabConfig`), and the quick variant.

The lab trains everything on the spot, so its budgets decide both whether the phenomena can show and whether the lab
fits its time box (15 minutes for three seeds on two CPU cores, three for `--quick`). The values below were set on
the calibration seeds (`CALIBRATION_SEEDS`), never on the seeds the report judges (docs/lab.md has the numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

# Seeds used to choose budgets and thresholds; the judged seeds must differ from them (checked below).
CALIBRATION_SEEDS = (100, 101)


@dataclass(frozen=True)
class LabConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    world_seed: int = 0  # the problems, the tokenizer and the two pattern teachers (shared by every seed)
    workers: int = 2  # independent jobs run in this many processes, one thread each
    # data: teachers train on `n_teacher_problems`, students on a disjoint, smaller pool (their knowledge gap)
    n_teacher_problems: int = 6000
    n_student_problems: int = 1000
    n_prompts: int = 2000  # OPD prompts (disjoint from both training pools)
    n_test: int = 200  # held-out problems per template
    n_dev: int = 100  # the students' stopping rule reads these
    teacher_size: str = "teacher"  # opd.toy.models.SIZES
    student_size: str = "student"
    # teachers: 3 layers x 64, trained on one pattern in the `what_is` template only
    teacher_steps: int = 1000
    teacher_lr: float = 5e-3
    # students (and the peer teacher, same size, data and stopping rule): 2 layers x 64, columns, both templates;
    # stopped at the first evaluation with dev accuracy >= student_target (at most student_steps)
    student_steps: int = 800
    student_lr: float = 3e-3
    student_target: float = 0.2
    eval_every: int = 10
    batch_size: int = 64
    # off-policy cold start: SFT the student on the partial-sums teacher's samples
    cold_rollouts: int = 1500
    cold_steps: int = 300
    cold_accept: str = "correct"  # which samples the cold start trains on: "correct" (rejection sampling) or "any"
    # OPD with the local engine
    opd_steps: int = 80
    opd_lr: float = 3e-4
    opd_prompts: int = 16  # prompts per step
    opd_n: int = 4  # samples per prompt
    top_k: int = 4
    test_freq: int = 20
    # pre-flight check (`opd check`) of each pair
    check_prompts: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "seeds":
                if not value or len(set(value)) != len(value):
                    raise ValueError(f"LabConfig.seeds={value!r} is not valid; expected distinct seeds")
                if set(value) & set(CALIBRATION_SEEDS):
                    raise ValueError(
                        f"LabConfig.seeds={value!r} include a calibration seed {CALIBRATION_SEEDS}: the criteria "
                        f"were tuned on those, so they cannot judge"
                    )
            elif f.name == "cold_accept":
                if value not in ("correct", "any"):
                    raise ValueError(f"LabConfig.cold_accept={value!r} is not valid; allowed: correct, any")
            elif isinstance(value, str):
                from opd.toy.models import SIZES

                if value not in SIZES:
                    raise ValueError(f"LabConfig.{f.name}={value!r} is not valid; allowed: {', '.join(SIZES)}")
            elif isinstance(value, int) and f.name != "world_seed" and value < 1:
                raise ValueError(f"LabConfig.{f.name}={value!r} is not valid; expected an integer >= 1")
            elif isinstance(value, float) and not value > 0:  # student_target > 1 never stops early
                raise ValueError(f"LabConfig.{f.name}={value!r} is not valid; expected > 0")

    def quick(self) -> "LabConfig":
        """The smoke run of experiments (a)-(c): one seed and half the OPD steps, the rest as in the full lab."""
        return replace(self, seeds=self.seeds[:1], opd_steps=self.opd_steps // 2)

    def tiny(self) -> "LabConfig":
        """Seconds-long settings for tests of the machinery (nothing can reproduce at this size)."""
        return replace(
            self,
            seeds=self.seeds[:1],
            teacher_size="tiny",
            student_size="tiny",
            n_teacher_problems=200,
            n_student_problems=100,
            n_prompts=64,
            n_test=16,
            n_dev=8,
            teacher_steps=4,
            student_steps=4,
            eval_every=2,
            batch_size=8,
            cold_rollouts=16,
            cold_steps=2,
            cold_accept="any",
            opd_steps=2,
            opd_prompts=4,
            opd_n=2,
            test_freq=1,
            check_prompts=4,
        )
