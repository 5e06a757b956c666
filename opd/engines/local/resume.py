"""Resuming a local-engine run: which checkpoint, which changed settings are applied and which are refused.

RESUME=auto takes the newest checkpoint that is intact (its manifest matches, it loads), printing one line for each
newer one it skips and why; RESUME=<checkpoint> to a damaged one stops with one line naming the damaged file and the
newest intact older checkpoint. A setting that differs from the checkpoint's run is handled as `RESUME_SETTINGS`
says, never only printed: "apply" settings take effect from the next step (the optimiser's hyperparameters are
written into its param groups and the LR schedule's base_lrs, since a restored optimiser state would otherwise keep
the old ones), "quiet" ones too but without a word (they change nothing a run computes), "data" ones are accepted
only while the usable prompts are the same (their fingerprint in the checkpoint), and "refuse" ones stop the run,
naming the setting. MINI_BATCH_SIZE is "apply": the data position is kept as prompts consumed, so the new batch
size continues right after the last prompt used (`opd.engines.local.data.PromptSchedule`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from opd.engines.local.checkpoint import CheckpointError, checkpoints, damage

APPLY, QUIET, DATA, REFUSE = "apply", "quiet", "data", "refuse"

# Every TrainConfig field (and algo.*), with how a change on resume is handled and why.
RESUME_SETTINGS: dict[str, tuple[str, str]] = {
    # --- the state a checkpoint continues ---
    "seed": (REFUSE, "it draws the data order and the random streams the checkpoint continues"),
    "actor_model_path": (REFUSE, "the run's initial student (its tokenizer and the KL reference)"),
    # --- the prompts: accepted only while the usable prompts are the same ---
    "train_dataset": (DATA, "the training prompts"),
    "max_prompt_length": (DATA, "which prompts are usable"),
    "enable_thinking": (DATA, "the rendered prompts"),
    # --- applied from the next step ---
    "mini_batch_size": (APPLY, "the data order continues after the last prompt used"),
    "total_epochs": (APPLY, "where the schedule ends (and the cosine LR's length)"),
    "total_steps": (APPLY, "where the schedule ends (and the cosine LR's length)"),
    "lr": (APPLY, "into the optimiser's param groups and the LR schedule's base_lrs"),
    "lr_scheduler": (APPLY, "the LR schedule's shape, at the checkpoint's step count"),
    "warmup_ratio": (APPLY, "the LR schedule's shape, at the checkpoint's step count"),
    "weight_decay": (APPLY, "into the optimiser's param groups"),
    "adam_beta1": (APPLY, "into the optimiser's param groups"),
    "adam_beta2": (APPLY, "into the optimiser's param groups"),
    "grad_clip": (APPLY, "read at every step"),
    "n_responses": (APPLY, "rollouts per prompt; the prompt order does not depend on it"),
    "max_resp_length": (APPLY, "rollout length"),
    "top_p": (APPLY, "rollout sampling"),
    "repetition_penalty": (APPLY, "rollout sampling"),
    "reward_model_path": (APPLY, "the teacher is loaded anew at every start"),
    "model_dtype": (APPLY, "weights and optimiser state are cast on load"),
    "teacher_dtype": (APPLY, "the frozen models are loaded anew"),
    "algo.*": (APPLY, "the algorithm's knobs are read at every step"),
    # --- computed the same way, or only logged / placed differently ---
    "micro_batch_tokens": (APPLY, "chunking of the same passes"),
    "rollout_batch_size": (APPLY, "sequences per sampler call"),
    "gradient_checkpointing": (APPLY, "recomputation of the same backward"),
    "compile_sampler": (APPLY, "the same sampler, compiled or not (samples may differ in the last bits)"),
    "device": (APPLY, "states are moved on load"),
    "test_files": (APPLY, "validation only"),
    "max_val_resp_length": (APPLY, "validation only"),
    "val_n": (APPLY, "validation only"),
    "val_temperature": (APPLY, "validation only"),
    "val_top_p": (APPLY, "validation only"),
    "val_before_train": (APPLY, "validation only"),
    "val_max_prompts": (APPLY, "validation only"),
    "save_freq": (APPLY, "when checkpoints are written"),
    "keep_last_n": (APPLY, "how many checkpoints are kept"),
    "test_freq": (APPLY, "when validation runs"),
    "log_samples": (APPLY, "what samples.jsonl records"),
    "profile_freq": (APPLY, "what profiles.jsonl records"),
    "progress": (QUIET, "the progress bar"),
    "resume": (QUIET, "how this run starts"),
    "output_dir": (QUIET, "where the run folder is"),
    "run_name": (QUIET, "where the run folder is"),
}


def policy(key: str) -> tuple[str, str]:
    """How a change of `key` (a TrainConfig field or algo.<name>) is handled on resume."""
    return RESUME_SETTINGS.get(key) or RESUME_SETTINGS["algo.*" if key.startswith("algo.") else key]


class ResumeError(ValueError):
    """A resume that cannot honour the settings; one line naming the setting."""


def _flat(d: dict) -> dict:
    return {**{k: v for k, v in d.items() if k != "algo"}, **{f"algo.{k}": v for k, v in (d.get("algo") or {}).items()}}


def saved_settings(checkpoint: Path, state: dict, run_dir: Path) -> dict | None:
    """The settings of the run that wrote `checkpoint`: stored in it, else (older checkpoints) the run's config.yaml."""
    if state.get("config"):
        return _flat(state["config"])
    for path in (Path(checkpoint).parent.parent / "config.yaml", Path(run_dir) / "config.yaml"):
        if path.is_file():
            return _flat(yaml.safe_load(path.read_text()) or {})
    return None


def changed_settings(before: dict | None, cfg) -> dict[str, tuple]:
    """{key: (checkpoint's value, this run's value)} for every setting that differs."""
    if before is None:
        return {}
    after = _flat(cfg.to_dict())
    return {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}


def check_changes(changes: dict[str, tuple], checkpoint: Path, *, prompts_match: bool | None) -> list[str]:
    """Refuse what cannot be applied (ResumeError, naming the first such setting); returns the "key: a -> b" texts
    of the applied changes worth a line."""
    shown = []
    for key, (old, new) in changes.items():
        kind, why = policy(key)
        if kind == REFUSE or (kind == DATA and prompts_match is False):
            reason = why if kind == REFUSE else f"{why}, and the usable prompts differ from the checkpoint's run"
            raise ResumeError(
                f"cannot resume {checkpoint} with {key} changed ({old!r} -> {new!r}): {reason}; set it back to "
                f"{old!r}, or start a new run (another RUN_NAME or OUTPUT_DIR)"
            )
        if kind != QUIET:
            shown.append(f"{key}: {old!r} -> {new!r}")
    return shown


def apply_optimizer_settings(optimizer, scheduler, *, lr: float, betas=None, weight_decay=None) -> None:
    """Put this run's lr (and betas / weight decay) into a restored optimiser and LR schedule, and recompute the
    current lr from the schedule as it now is. With unchanged settings this rewrites the same values."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        if betas is not None:
            group["betas"] = tuple(betas)
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, factors):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def data_start(state: dict, saved: dict | None, cfg, n_prompts: int, fingerprint: str) -> tuple[int, dict]:
    """The schedule's anchor (step, {"epoch", "prompts_in_epoch"}) from a checkpoint's data position, after checking
    that the usable prompts are the ones the checkpoint's run read."""
    step, where = int(state["step"]), state["data_position"]
    have_n, have_fp = where.get("n_prompts"), where.get("prompts_sha256")
    if (have_n is not None and have_n != n_prompts) or (have_fp is not None and have_fp != fingerprint):
        data_keys = [k for k, (kind, _) in RESUME_SETTINGS.items() if kind == DATA]
        raise ResumeError(
            f"cannot resume: the training set now has {n_prompts} usable prompts"
            + (f", the checkpoint's run had {have_n}" if have_n != n_prompts else " that differ from the checkpoint's")
            + f" ({', '.join(data_keys)}, the file's contents or the tokenizer changed); restore them, or start a new "
            "run (another RUN_NAME or OUTPUT_DIR)"
        )
    if "prompts_in_epoch" in where:
        return step, {"epoch": int(where["epoch"]), "prompts_in_epoch": int(where["prompts_in_epoch"])}
    # a checkpoint from before prompt-keyed positions: a batch index, in the batch size of the run that wrote it
    size = (saved or {}).get("mini_batch_size", cfg.mini_batch_size)
    if size != cfg.mini_batch_size:
        raise ResumeError(
            f"cannot resume with mini_batch_size changed ({size} -> {cfg.mini_batch_size}): this checkpoint records "
            f"its data position as a batch index; set MINI_BATCH_SIZE back to {size}"
        )
    return step, {"epoch": int(where["epoch"]), "prompts_in_epoch": int(where["batch_in_epoch"]) * size}


def candidates(resume: str, run_dir: Path, *, prog: str = "opd train", flag: str = "RESUME=") -> Iterator[Path]:
    """Checkpoints to try, best first. RESUME=auto: the intact ones under the run folder, newest first, with one
    line for each damaged one skipped. RESUME=<path>: that one, or a CheckpointError pointing at an older one.
    `flag` is how the command spells the setting in its hints ("RESUME=", "--resume ")."""
    if resume == "off":
        return
    if resume != "auto":
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint folder (no trainer_state.json)")
        problem = damage(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}; {older_hint(path, flag)}")
        yield path
        return
    for path in checkpoints(run_dir):
        problem = damage(path)
        if problem is None:
            yield path
        else:
            print(f"{prog}: skipping damaged checkpoint {path}: {problem}", file=sys.stderr)


def older_hint(path: Path, flag: str = "RESUME=") -> str:
    """Where to resume from instead of the damaged checkpoint `path`."""
    path = Path(path)
    step = _step_of(path)
    for older in checkpoints(path.parent.parent):
        if (step is None or _step_of(older) < step) and older != path and damage(older) is None:
            return f"the newest intact older checkpoint is {older} ({flag}{older})"
    return f"no intact older checkpoint exists: start over ({flag}off)"


def _step_of(path: Path) -> int | None:
    name = Path(path).name
    return int(name[len("step_") :]) if name.startswith("step_") and name[len("step_") :].isdigit() else None


def restore(
    cfg, run_dir: Path, *, model, optimizer, generator, n_prompts: int, fingerprint: str, build, prog="opd train"
):
    """Continue from the best usable checkpoint, if any: returns (start step, schedule, LR scheduler) with every
    state restored and this run's settings applied. `build(start)` makes the (schedule, LR scheduler) pair for a
    data anchor (None: a fresh start). RESUME=auto falls back past checkpoints that fail to load, saying so."""
    from opd.engines.local.checkpoint import load_checkpoint, read_state

    for checkpoint in candidates(cfg.resume, run_dir, prog=prog):
        state = read_state(checkpoint)
        saved = saved_settings(checkpoint, state, run_dir)
        have_fp = state["data_position"].get("prompts_sha256")
        shown = check_changes(
            changed_settings(saved, cfg), checkpoint, prompts_match=None if have_fp is None else have_fp == fingerprint
        )
        start = data_start(state, saved, cfg, n_prompts, fingerprint)
        schedule, scheduler = build(start)
        try:
            load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator)
        except CheckpointError as exc:
            if cfg.resume != "auto":
                raise CheckpointError(f"{exc}; {older_hint(checkpoint)}") from None
            print(f"{prog}: skipping damaged checkpoint {checkpoint}: {exc}", file=sys.stderr)
            continue
        apply_optimizer_settings(
            optimizer,
            scheduler,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay,
        )
        if shown:
            print(f"{prog}: resuming {checkpoint} with changed settings (applied): {', '.join(shown)}", file=sys.stderr)
        return int(state["step"]), schedule, scheduler
    if cfg.resume == "auto" and checkpoints(run_dir):
        raise CheckpointError(
            f"no intact checkpoint under {Path(run_dir) / 'checkpoints'} (each one is damaged, see above): move the "
            f"folder away and start over, or repair a checkpoint and resume from it with RESUME=<checkpoint>"
        )
    schedule, scheduler = build(None)
    return 0, schedule, scheduler
