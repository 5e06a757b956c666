"""What the lab trains and runs, as job specs, and the runner that executes them in worker processes.

The cast (one world; the two pattern teachers are shared by every seed, the rest is drawn per seed):
  teacher_columns  3 x 64, SFT on gold answers in the columns pattern, `what_is` template only
  teacher_partial  the same budget in the partial-sums pattern (similar accuracy, another way of thinking)
  student          2 x 64, a short SFT in the columns pattern on a smaller pool, both templates: weak
  peer             the student's size, data and budget from another init: a teacher with nothing new to teach
  student_cold     the student after SFT on teacher_partial's accepted samples (the off-policy cold start)
The OPD pairs (student <- teacher, prompt template): compatible, incompatible, cold_start, peer, misaligned
(the compatible teacher on prompts in the template it never saw). `--quick` runs the first three.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from opd.lab.config import LabConfig
from opd.lab.stages import JOBS, job_dir

QUICK_PAIRS = ("compatible", "incompatible", "cold_start")
ALL_PAIRS = (*QUICK_PAIRS, "peer", "misaligned")


@dataclass(frozen=True)
class Job:
    kind: str  # a key of stages.JOBS
    spec: dict


def world_sizes(cfg: LabConfig) -> dict[str, int]:
    return {
        "test": cfg.n_test,
        "prompts": cfg.n_prompts,
        "teacher": cfg.n_teacher_problems,
        "student": cfg.n_student_problems,
        "dev": cfg.n_dev,
    }


def _model_dir(lab_dir: Path, spec: dict) -> str:
    return str(job_dir(lab_dir, "models", spec) / "model")


def cast(cfg: LabConfig, lab_dir: Path, seed: int) -> dict[str, dict]:
    """The SFT specs of every model one seed needs, by role."""
    common = {"world_seed": cfg.world_seed, "sizes": world_sizes(cfg), "batch_size": cfg.batch_size}
    teachers = {
        f"teacher_{pattern}": {
            **common,
            "name": f"teacher_{pattern}",
            "size": cfg.teacher_size,
            "pattern": pattern,
            "templates": ["what_is"],
            "pool": "teacher",
            "n_problems": cfg.n_teacher_problems,
            "steps": cfg.teacher_steps,
            "lr": cfg.teacher_lr,
            "init_seed": cfg.world_seed * 7 + 1 + i,
            "data_seed": cfg.world_seed * 7 + 1 + i,
        }
        for i, pattern in enumerate(("columns", "partial"))
    }
    student_like = {
        **common,
        "size": cfg.student_size,
        "pattern": "columns",
        "templates": ["what_is", "sum_of"],
        "pool": "student",
        "n_problems": cfg.n_student_problems,
        "steps": cfg.student_steps,
        "lr": cfg.student_lr,
        "data_seed": seed * 7 + 3,
        "stop_at": cfg.student_target,
        "eval_every": cfg.eval_every,
    }
    student = {**student_like, "name": f"student_s{seed}", "init_seed": seed * 7 + 3}
    peer = {**student_like, "name": f"peer_s{seed}", "init_seed": seed * 7 + 4}
    cold = {
        **common,
        "name": f"student_cold_s{seed}",
        "size": cfg.student_size,
        "templates": ["what_is"],
        "pool": "student",
        "n_problems": cfg.cold_rollouts,
        "steps": cfg.cold_steps,
        "lr": cfg.student_lr,
        "data_seed": seed * 7 + 5,
        "accept": cfg.cold_accept,
        "samples_from": _model_dir(lab_dir, teachers["teacher_partial"]),
        "init_from": _model_dir(lab_dir, student),
    }
    return {**teachers, "student": student, "peer": peer, "student_cold": cold}


def pairs(cfg: LabConfig, lab_dir: Path, seed: int, names: tuple[str, ...]) -> dict[str, dict]:
    """The OPD / check spec of each pair: student, teacher (model folders) and the prompt template."""
    c = {role: _model_dir(lab_dir, spec) for role, spec in cast(cfg, lab_dir, seed).items()}
    table = {
        "compatible": (c["student"], c["teacher_columns"], "what_is"),
        "incompatible": (c["student"], c["teacher_partial"], "what_is"),
        "cold_start": (c["student_cold"], c["teacher_partial"], "what_is"),
        "peer": (c["student"], c["peer"], "what_is"),
        "misaligned": (c["student"], c["teacher_columns"], "sum_of"),
    }
    common = {"world_seed": cfg.world_seed, "sizes": world_sizes(cfg), "seed": seed, "top_k": cfg.top_k}
    return {
        name: {**common, "name": f"{name}_s{seed}", "student": s, "teacher": t, "template": tpl}
        for name, (s, t, tpl) in table.items()
        if name in names
    }


def jobs(cfg: LabConfig, lab_dir: Path, names: tuple[str, ...]) -> list[Job]:
    """Every job of the lab, each once (the teachers are shared by the seeds), longest kinds first."""
    out: dict[str, Job] = {}
    opd = {"steps": cfg.opd_steps, "lr": cfg.opd_lr, "prompts": cfg.opd_prompts, "n": cfg.opd_n}
    for seed in cfg.seeds:
        roles = cast(cfg, lab_dir, seed)
        wanted = ["teacher_columns", "teacher_partial", "student"]
        wanted += [role for role, pair in (("peer", "peer"), ("student_cold", "cold_start")) if pair in names]
        for role in wanted:
            out[f"sft:{roles[role]['name']}"] = Job("sft", roles[role])
        for spec in pairs(cfg, lab_dir, seed, names).values():
            out[f"opd:{spec['name']}"] = Job("opd", {**spec, **opd, "test_freq": cfg.test_freq})
            out[f"check:{spec['name']}"] = Job("check", {**spec, "n_prompts": cfg.check_prompts})
    return list(out.values())


def key(job: Job) -> str:
    return f"{job.kind}:{job.spec['name']}"


def needs(job: Job, all_jobs: list[Job], lab_dir: Path) -> set[str]:
    """The jobs that make the model folders `job` reads."""
    made_by = {_model_dir(lab_dir, j.spec): key(j) for j in all_jobs if j.kind == "sft"}
    return {made_by[v] for v in job.spec.values() if isinstance(v, str) and v in made_by}


def _run(kind: str, lab_dir: str, spec: dict) -> dict:
    return JOBS[kind](Path(lab_dir), spec)


RANK = {"sft": 0, "opd": 1, "check": 2}  # among ready jobs: models first (others wait on them), checks last


def blocked_by(deps: dict[str, set[str]]) -> dict[str, int]:
    """How many jobs wait, directly or not, on each job: the ones that unblock most start first."""
    below: dict[str, set[str]] = {k: set() for k in deps}
    for k, ds in deps.items():
        stack = list(ds)
        while stack:
            d = stack.pop()
            if k not in below[d]:
                below[d].add(k)
                stack.extend(deps[d])
    return {k: len(v) for k, v in below.items()}


def run_jobs(all_jobs: list[Job], lab_dir: Path, workers: int, on_done=None) -> dict[str, dict]:
    """Run `all_jobs` on `workers` processes, each as soon as the models it reads exist; results by job key."""
    deps = {key(j): needs(j, all_jobs, lab_dir) for j in all_jobs}
    unblocks = blocked_by(deps)
    waiting = sorted(all_jobs, key=lambda j: (RANK[j.kind], -unblocks[key(j)]))
    results: dict[str, dict] = {}

    def ready() -> list[Job]:
        return [j for j in waiting if deps[key(j)] <= results.keys()]

    def finished(job: Job, result: dict) -> None:
        results[key(job)] = result
        if on_done:
            on_done(job)

    if workers == 1:
        while waiting:
            job = ready()[0]
            waiting.remove(job)
            finished(job, _run(job.kind, str(lab_dir), job.spec))
        return results
    import multiprocessing

    running = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while waiting or running:
            for job in ready()[: max(0, workers - len(running))]:
                waiting.remove(job)
                running[pool.submit(_run, job.kind, str(lab_dir), job.spec)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                finished(running.pop(future), future.result())
    return results
