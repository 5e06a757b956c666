"""The local engine's training loop: one process, CPU or one GPU, plain PyTorch + transformers.

    python -c "from opd.engines.local import train, TrainConfig; train(TrainConfig(...))"   # or `opd train`

Per step (one optimiser step on the step's own rollouts, i.e. on-policy):
  1. rollout: MINI_BATCH_SIZE prompts x N_RESPONSES samples from the student (KV-cached sampler), graded by the rule
     reward (logged as true_reward for every estimator);
  2. score: student and teacher no-grad passes -> reads -> support, rewards, advantages (`opd.core.step`);
  3. update: the student re-run with gradient at the stored slots (the K dimension kept), AdamW, grad clipping;
  4. log metrics.jsonl / TensorBoard, validate every TEST_FREQ steps, checkpoint every SAVE_FREQ steps.
The run folder `<output_dir>/<run_name>/` holds config.yaml (the resolved config), metrics.jsonl, profiles.jsonl,
tensorboard/ and checkpoints/. RESUME=auto continues from the last checkpoint and reproduces the uninterrupted run.

metrics.jsonl keys (one line per step; step 0 = validation before training):
  opd/...      the core's dynamics diagnostics (opd.core.metrics: overlap_ratio, overlap_mass_{student,teacher},
               top1_agreement, reverse_kl, entropy/{student,teacher,gap}, advantage_mean, overlap_token_advantage,
               {student,teacher}_only_advantage, max_adv/*, min_adv/*, candidates/*, response_length/*, pos/<window>/*).
               reverse_kl is the exact KL_t with the full vocabulary, else the k1 estimate lp - lq at the sampled token.
  actor/...    loss, pg_loss, kl_loss, full_vocab_loss, grad_norm (before clipping), lr, skipped_step, clip fractions
  train/...    true_reward (rule-reward accuracy of the rollouts), format_ok, response_length, response_clip_ratio
  val/...      val/<data_source>/{mean,best,maj}@n, val/<data_source>/response_length, val/mean@n (validation only)
  perf/...     seconds per phase and tokens/s (the only keys that differ between identical runs)
  data/...     prompt counts (kept, dropped as too long)
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from opd.core.step import (
    StepReads,
    Targets,
    build_targets,
    needs_outcome_scores,
    step_diagnostics,
    step_profile,
    student_reads_suffice,
)
from opd.engines.local.checkpoint import clean_unfinished, latest_checkpoint, save_checkpoint
from opd.engines.local.config import TrainConfig, config_yaml, run_name_from, sampling_bias_warnings
from opd.engines.local.data import PromptSchedule, PromptSet, load_prompt_set, prompts_fingerprint
from opd.engines.local.heads import use_output_heads
from opd.engines.local.logging import RunLogger
from opd.engines.local.resume import restore
from opd.engines.local.rollout import GRADE_WORKERS, RolloutBatch, Rollouts, generate
from opd.engines.local.scoring import SamplerReads, reference_logprobs, score
from opd.engines.local.update import loss_and_backward, optimizer_step
from opd.engines.local.validation import validate
from opd.grading import start_workers
from opd.io import atomic_write_text
from opd.models import load_causal_lm, load_pair, open_pair, resolve_device
from opd.optim import make_optimizer, make_scheduler

PROFILE_BINS = 128  # per-position profiles are binned to about this many points (profiles.jsonl stays small)


@dataclass
class Session:
    """Everything a step reads; built once by `setup`."""

    cfg: TrainConfig
    run_dir: Path
    tokenizer: object
    vocab_width: int | None
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    reference: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator
    train_set: PromptSet
    val_sets: list[PromptSet]
    schedule: PromptSchedule
    eos_ids: list[int]
    pad_id: int
    start_step: int
    last_profile: dict = field(default_factory=dict)  # per-position profile of the latest step, when logged
    last_samples: list = field(default_factory=list)  # decoded rollouts of the latest step


def train(cfg: TrainConfig) -> Path:
    """Run (or continue) training; returns the run folder."""
    for warning in sampling_bias_warnings(cfg):
        print(f"opd train: warning: {warning}", file=sys.stderr)
    s = setup(cfg)
    logger = RunLogger(s.run_dir, start_step=s.start_step)
    total = s.schedule.total_steps
    try:
        if s.start_step == 0 and cfg.val_before_train and s.val_sets:
            logger.log(0, run_validation(s, step=0))
        bar = tqdm(
            range(s.start_step + 1, total + 1),
            initial=s.start_step,
            total=total,
            desc="opd train",
            unit="step",
            disable=not cfg.progress,
        )
        for step in bar:
            metrics = train_step(s, step)
            if s.val_sets and cfg.test_freq > 0 and (step % cfg.test_freq == 0 or step == total):
                metrics.update(run_validation(s, step=step))
            logger.log(step, metrics)
            if s.last_samples:
                logger.log_samples(step, s.last_samples)
            if profile_due(s, step):
                logger.log_profile(step, s.last_profile)
            if cfg.save_freq > 0 and (step % cfg.save_freq == 0 or step == total):
                save(s, step)
            shown = {"loss": f"{metrics['actor/loss']:.4f}"}
            if "opd/overlap_ratio" in metrics:  # absent without a teacher (GRPO)
                shown["overlap"] = f"{metrics['opd/overlap_ratio']:.3f}"
            shown["reward"] = f"{metrics['train/true_reward']:.3f}"
            bar.set_postfix(shown)
    finally:
        logger.close()
    return s.run_dir


def setup(cfg: TrainConfig) -> Session:
    algo = cfg.algo
    # 1. the models' folders and vocabularies first: a mismatch must fail before any compute
    folders = open_pair(
        cfg.actor_model_path,
        cfg.reward_model_path,
        names=("ACTOR_MODEL_PATH", "REWARD_MODEL_PATH"),
        with_teacher=algo.needs_teacher,
    )
    start_workers(GRADE_WORKERS)  # the rule reward's math-verify workers start while the models load
    tokenizer, vocab_width = folders.tokenizer, folders.vocab_width
    run_dir = Path(cfg.output_dir) / (cfg.run_name or run_name_from(cfg))
    clean_unfinished(run_dir)  # what a save killed midway left (`.tmp-step_*`), before anything is read

    # 2. prompts, tokenised once with the student's chat template
    template_kwargs = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
    train_set = load_prompt_set(
        cfg.train_dataset, tokenizer, max_prompt_length=cfg.max_prompt_length, template_kwargs=template_kwargs
    )
    val_sets = [
        load_prompt_set(
            path,
            tokenizer,
            max_prompt_length=cfg.max_prompt_length,
            template_kwargs=template_kwargs,
            limit=cfg.val_max_prompts,
        )
        for path in cfg.test_files
    ]
    for prompt_set in [train_set, *val_sets]:
        if prompt_set.dropped_too_long:
            print(
                f"opd train: {prompt_set.path}: dropped {prompt_set.dropped_too_long} prompts longer than "
                f"MAX_PROMPT_LENGTH={cfg.max_prompt_length} tokens; kept {len(prompt_set.problems)}",
                file=sys.stderr,
            )
    fingerprint = prompts_fingerprint(train_set.problems)

    # 3. models, optimiser, random state
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    frozen_dtype = cfg.teacher_dtype or cfg.model_dtype
    pair = load_pair(
        folders,
        device=device,
        dtype=cfg.model_dtype,
        teacher_dtype=frozen_dtype,
        trainable=True,
        top_k=algo.top_k,
        top_k_name="LOG_PROB_TOP_K",
    )
    student, teacher, eos_ids, pad_id = pair.student, pair.teacher, pair.eos_ids, pair.pad_id
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    reference = None  # KL-to-reference: the initial student
    if algo.use_kl:
        reference = load_causal_lm(folders.student, dtype=frozen_dtype, device=device, trainable=False)
    optimizer = make_optimizer(
        student, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def build(start):
        """The data order (from a resumed data position, or the start) and the LR schedule over its length."""
        sched = PromptSchedule(
            len(train_set.problems), cfg.mini_batch_size, cfg.seed, cfg.total_epochs, cfg.total_steps, start=start
        )
        lr_sched = make_scheduler(
            optimizer, kind=cfg.lr_scheduler, total_steps=sched.total_steps, warmup_ratio=cfg.warmup_ratio
        )
        return sched, lr_sched

    # 4. resume (opd.engines.local.resume: which checkpoint, which changed settings are applied or refused)
    if cfg.resume == "off" and (earlier := latest_checkpoint(run_dir)) is not None:
        # starting over beside an earlier run's checkpoints would let a later RESUME=auto mix the two runs
        raise ValueError(
            f"{run_dir} holds checkpoints of an earlier run ({earlier.name}) and "
            f"RESUME={cfg.resume}: continue it with RESUME=auto, pick another RUN_NAME/OUTPUT_DIR, or "
            f"delete {run_dir / 'checkpoints'}"
        )
    start_step, schedule, scheduler = restore(
        cfg,
        run_dir,
        model=student,
        optimizer=optimizer,
        generator=generator,
        n_prompts=len(train_set.problems),
        fingerprint=fingerprint,
        build=build,
    )
    if start_step == 0 and (run_dir / "metrics.jsonl").exists():
        print(
            f"opd train: {run_dir} holds an earlier run without a checkpoint to resume (RESUME={cfg.resume}); "
            f"starting over and replacing its metrics and TensorBoard events",
            file=sys.stderr,
        )
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    if start_step and start_step >= schedule.total_steps:
        print(
            f"opd train: {run_dir} is already complete at step {start_step} (of {schedule.total_steps})",
            file=sys.stderr,
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_yaml(cfg))
    return Session(
        cfg,
        run_dir,
        tokenizer,
        vocab_width,
        student,
        teacher,
        reference,
        optimizer,
        scheduler,
        generator,
        train_set,
        val_sets,
        schedule,
        eos_ids,
        pad_id,
        start_step,
    )


def train_step(s: Session, step: int) -> dict[str, float]:
    cfg = s.cfg
    t0 = time.perf_counter()
    problems = [s.train_set.problems[i] for i in s.schedule.batch(step)]
    heads, seen = step_plan(s, len(problems))
    rollouts = sample_rollouts(s, problems, observe=seen)
    device = next(s.student.parameters()).device
    batch = rollouts.batch.to(device)
    t1 = time.perf_counter()

    scores = score_rollouts(s, batch, heads=heads, seen=seen)
    reads = scores.reads
    targets = rollout_targets(s, rollouts, batch, reads)
    t2 = time.perf_counter()

    metrics = update_student(s, batch, targets, scores)
    t3 = time.perf_counter()
    passes = scores.passes
    del scores

    metrics.update(rollout_metrics(rollouts))
    keep = range(min(cfg.log_samples, len(rollouts.texts)))
    groups = batch.group_index_N.tolist()
    s.last_samples = [
        {
            "prompt": s.tokenizer.decode(problems[groups[i]].prompt_ids),
            "response": rollouts.texts[i],
            "score": rollouts.scores[i],
            "ground_truth": problems[groups[i]].ground_truth,
        }
        for i in keep
    ]
    metrics.update(step_diagnostics(reads, batch.response_mask_NT, targets))
    s.last_profile = (  # only on the steps whose profile is logged: it costs a few ms a step at a small size
        step_profile(reads, batch.response_mask_NT, targets, bin_size=max(1, cfg.max_resp_length // PROFILE_BINS))
        if profile_due(s, step)
        else {}
    )
    tokens = float(batch.attention_mask_NL.sum())
    metrics.update(
        {
            "perf/time_rollout_s": t1 - t0,
            "perf/time_score_s": t2 - t1,
            "perf/time_update_s": t3 - t2,
            "perf/time_student_pass_s": passes["student"],
            "perf/time_teacher_pass_s": passes["teacher"],
            "data/train_prompts": float(len(s.train_set.problems)),
            "data/train_prompts_dropped_too_long": float(s.train_set.dropped_too_long),
            "perf/time_step_s": t3 - t0,
            "perf/tokens_per_s": tokens / max(t3 - t0, 1e-9),
            "train/epoch": float(s.schedule.position(step)["epoch"]),
        }
    )
    return metrics


def profile_due(s: Session, step: int) -> bool:
    """Whether `step`'s per-position profile is logged (profiles.jsonl): the first and last steps, every
    PROFILE_FREQ steps."""
    return step in (1, s.schedule.total_steps) or (s.cfg.profile_freq > 0 and step % s.cfg.profile_freq == 0)


@dataclass
class StepScores:
    """What scoring hands the update: the reads, the teacher's final hidden states when the update runs from
    output heads (one teacher forward per step), and the seconds of each model's pass."""

    reads: StepReads
    teacher_hidden: list[torch.Tensor] | None
    passes: dict[str, float]


def step_plan(s: Session, n_prompts: int) -> tuple[bool, SamplerReads | None]:
    """(heads, observer): whether the full-vocabulary update runs from output heads (then the KL diagnostic comes
    from the update), and the sampler observer that records the student's reads, when they suffice for scoring."""
    algo = s.cfg.algo
    heads = use_output_heads(algo, s.student, s.teacher)
    if not student_reads_suffice(algo, heads):
        return heads, None
    return heads, SamplerReads(algo, n_prompts * s.cfg.n_responses, s.cfg.max_resp_length, s.vocab_width)


def score_rollouts(s: Session, batch: RolloutBatch, *, heads: bool, seen: SamplerReads | None) -> StepScores:
    """The step's no-grad passes (`opd.engines.local.scoring.score`) as `train_step` runs them."""
    if seen is None:  # the student runs here only when the sampler's reads do not serve
        s.student.eval()
    passes: dict[str, float] = {}
    teacher_hidden = [] if heads else None
    reads = score(
        s.student,
        s.teacher,
        batch,
        s.cfg.algo,
        token_budget=s.cfg.micro_batch_tokens,
        vocab_size=s.vocab_width,
        timings=passes,
        teacher_hidden=teacher_hidden,
        student_reads=None if seen is None else seen.stats(batch.response_ids_NT.shape[1]),
    )
    if heads and reads.full_kl_NT is None:  # filled by the update's full-vocabulary loss
        reads.full_kl_NT = torch.zeros(batch.response_ids_NT.shape, device=batch.response_ids_NT.device)
    return StepScores(reads, teacher_hidden, passes)


def rollout_targets(s: Session, rollouts: Rollouts, batch: RolloutBatch, reads: StepReads) -> Targets:
    """Support, rewards and advantages of the step (`build_targets`), and the reference's log-probs with USE_KL."""
    cfg, algo = s.cfg, s.cfg.algo
    device = batch.response_ids_NT.device
    targets = build_targets(
        algo,
        reads,
        response_ids_NT=batch.response_ids_NT,
        response_mask_NT=batch.response_mask_NT,
        group_index_N=batch.group_index_N,
        outcome_scores_N=(
            torch.tensor(rollouts.scores, dtype=torch.float32, device=device)
            if needs_outcome_scores(algo)
            else None  # not read: the grading, in the background since the rollout, is waited for only at the metrics
        ),
        has_box_N=torch.tensor(["\\boxed" in text for text in rollouts.texts], device=device),
    )
    if s.reference is not None:
        targets.ref_lp_NTC = reference_logprobs(
            s.reference, batch, targets, algo, token_budget=cfg.micro_batch_tokens, vocab_size=s.vocab_width
        )
    return targets


def update_student(s: Session, batch: RolloutBatch, targets: Targets, scores: StepScores) -> dict[str, float]:
    """The update (forward + backward, micro-batched) and the optimiser step; fills `scores.reads.full_kl_NT`
    when the full-vocabulary loss runs from output heads."""
    cfg = s.cfg
    s.student.train()
    metrics = loss_and_backward(
        s.student,
        batch,
        targets,
        cfg.algo,
        token_budget=cfg.micro_batch_tokens,
        norm_length=cfg.max_resp_length,
        teacher=s.teacher,
        vocab_size=s.vocab_width,
        teacher_hidden=scores.teacher_hidden,
        full_kl_NT=scores.reads.full_kl_NT,
    )
    scores.teacher_hidden = None  # free the teacher's hidden states before the optimiser step
    metrics.update(optimizer_step(s.student, s.optimizer, s.scheduler, grad_clip=cfg.grad_clip))
    return metrics


def sample_rollouts(s: Session, problems: list, observe=None) -> Rollouts:
    """The step's rollouts: N_RESPONSES samples per problem from the student, graded by the rule reward.

    `observe` (a `SamplerReads`) records the student's reads from the sampler's own logits."""
    cfg = s.cfg
    return generate(
        s.student,
        s.tokenizer,
        [p.prompt_ids for p in problems],
        [p.ground_truth for p in problems],
        n=cfg.n_responses,
        max_new_tokens=cfg.max_resp_length,
        temperature=cfg.algo.temperature,
        top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty,
        generator=s.generator,
        batch_size=cfg.rollout_batch_size,
        eos_ids=s.eos_ids,
        pad_id=s.pad_id,
        observe=observe,
        compile=cfg.compile_sampler,
    )


def rollout_metrics(rollouts: Rollouts) -> dict[str, float]:
    lengths = rollouts.batch.response_mask_NT.sum(-1)
    n = max(1, len(rollouts.scores))
    return {
        "train/true_reward": sum(rollouts.scores) / n,
        "train/format_ok": sum(e is not None for e in rollouts.extracted) / n,
        "train/response_length": float(lengths.mean()),
        "train/response_clip_ratio": sum(rollouts.truncated) / n,
    }


def run_validation(s: Session, step: int) -> dict[str, float]:
    cfg = s.cfg
    t0 = time.perf_counter()
    out = validate(
        s.student,
        s.tokenizer,
        s.val_sets,
        n=cfg.val_n,
        temperature=cfg.val_temperature,
        top_p=cfg.val_top_p,
        max_new_tokens=cfg.max_val_resp_length,
        repetition_penalty=cfg.repetition_penalty,
        seed=cfg.seed,
        step=step,
        batch_size=cfg.rollout_batch_size,
        eos_ids=s.eos_ids,
        pad_id=s.pad_id,
        progress=cfg.progress,
    )
    out["perf/time_validation_s"] = time.perf_counter() - t0
    return out


def save(s: Session, step: int) -> None:
    """Checkpoint after `step`, with the data position as prompts consumed and the settings it ran with."""
    where = s.schedule.cursor(step + 1)
    save_checkpoint(
        s.run_dir,
        step,
        model=s.student,
        tokenizer=s.tokenizer,
        optimizer=s.optimizer,
        scheduler=s.scheduler,
        generator=s.generator,
        data_position={
            **s.schedule.position(step + 1),
            **where,
            "n_prompts": len(s.train_set.problems),
            "prompts_sha256": prompts_fingerprint(s.train_set.problems),
        },
        config=s.cfg.to_dict(),
        keep_last_n=s.cfg.keep_last_n,
    )
