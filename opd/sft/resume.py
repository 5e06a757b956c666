"""Checkpoints and resume for `opd sft`: a killed run continues where its last checkpoint left it.

While it trains, `opd sft --output OUT` works in `OUT.partial/` (visible, next to OUT): `checkpoints/step_<N>/` every
--save-steps steps (the local engine's checkpoint format, `opd.engines.local.checkpoint`: model, optimiser,
schedule, random states, manifest written last) and `sft_log.jsonl`. The loop state that a checkpoint adds is
the shuffle's random state and the queue of conversations not yet used, so a resumed run draws exactly the batches
the uninterrupted run would have drawn, and a changed --batch-size continues after the last conversation used. At
the end OUT is written whole (model, tokenizer, sft_log.jsonl) and OUT.partial/ is removed. Rerunning the same
command resumes (--resume auto, the default); `--resume off` discards OUT.partial/ and starts over.

A setting that differs from the checkpoint's run is applied or refused as `SFT_RESUME_SETTINGS` says.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opd.engines.local.checkpoint import (
    CheckpointError,
    checkpoints,
    clean_unfinished,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from opd.engines.local.logging import keep_until
from opd.engines.local.resume import APPLY, QUIET, REFUSE, ResumeError, apply_optimizer_settings, candidates
from opd.engines.local.resume import older_hint as _older_hint
from opd.io import storage_errors

PROG = "opd sft"

# Every setting a checkpoint records, with how a change on resume is handled and why.
SFT_RESUME_SETTINGS: dict[str, tuple[str, str]] = {
    "model": (REFUSE, "the initial weights the checkpoint continues"),
    "data_sha256": (REFUSE, "the encoded conversations (--data, --max-length, --chat-template-kwargs, the tokenizer)"),
    "seed": (REFUSE, "it draws the order of the conversations"),
    "max_length": (APPLY, "accepted while the encoded conversations stay the same (data_sha256)"),
    "lr": (APPLY, "into the optimiser's param groups and the LR schedule's base_lrs"),
    "betas": (APPLY, "into the optimiser's param groups"),
    "weight_decay": (APPLY, "into the decayed param group"),
    "steps": (APPLY, "where the run ends (and the cosine's length)"),
    "epochs": (APPLY, "where the run ends (and the cosine's length)"),
    "batch_size": (APPLY, "the order continues after the last conversation used"),
    "micro_batch_size": (APPLY, "gradient accumulation of the same batch"),
    "warmup_ratio": (APPLY, "the LR schedule's shape, at the checkpoint's step count"),
    "min_lr_ratio": (APPLY, "the LR schedule's shape, at the checkpoint's step count"),
    "grad_clip": (APPLY, "read at every step"),
    "dtype": (APPLY, "weights and optimiser state are cast on load"),
    "device": (APPLY, "states are moved on load"),
    "log_every": (APPLY, "what sft_log.jsonl records"),
    "eval_every": (APPLY, "when evaluate() runs"),
    "stop_metric": (APPLY, "the early-stopping rule"),
    "stop_threshold": (APPLY, "the early-stopping rule"),
    "progress": (QUIET, "the progress bar"),
}


def data_fingerprint(input_ids, labels) -> str:
    """sha256 of the encoded conversations (ids and labels, in order): what a resumed run must train on."""
    h = hashlib.sha256()
    for ids, lab in zip(input_ids, labels):
        h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        h.update(np.asarray(lab, dtype=np.int64).tobytes() + b";")
    return h.hexdigest()


def partial_dir(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".partial")


def _plain(value):
    return json.loads(json.dumps(value))


@dataclass
class SFTRun:
    """The work folder of one `opd sft` run: checkpoints every `save_steps` steps, the log, resume."""

    output: Path
    tokenizer: object
    settings: dict  # what the checkpoints record and a resume compares (SFT_RESUME_SETTINGS' keys)
    save_steps: int = 0  # 0: no checkpoints
    keep_last_n: int = 2
    resume: str = "auto"  # auto | off | a checkpoint folder
    on_log: object = None
    _log: object = field(default=None, repr=False)

    @property
    def folder(self) -> Path:
        return partial_dir(self.output)

    @property
    def log_path(self) -> Path:
        return self.folder / "sft_log.jsonl"

    def prepare(self) -> None:
        """Clean what an interrupted run left: unfinished saves, a half-written final output, and the hidden temp
        folders that earlier versions of `opd sft` left next to the output; `--resume off` discards the work folder."""
        for stale in sorted(self.output.parent.glob(f".{self.output.name}.tmp*")):
            shutil.rmtree(stale, ignore_errors=True)
            print(f"{PROG}: removed {stale} (left by an interrupted run)", file=sys.stderr)
        if self.resume == "off" and self.folder.exists():
            shutil.rmtree(self.folder)
            print(f"{PROG}: --resume off: removed {self.folder} (an earlier unfinished run)", file=sys.stderr)
        shutil.rmtree(self.folder / "final.tmp", ignore_errors=True)
        clean_unfinished(self.folder, prog=PROG)

    def restore(self, model, optimizer, scheduler) -> dict | None:
        """Load the best usable checkpoint into model / optimiser / schedule and apply this run's settings; returns
        {"step", "rng", "order"} or None (a fresh start). Damaged checkpoints are skipped as `opd train` does."""
        for checkpoint in candidates(self.resume, self.folder, prog=PROG, flag="--resume "):
            state = read_state(checkpoint)
            self._check(checkpoint, state.get("config") or {})
            try:
                state = load_checkpoint(
                    checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, generator=None
                )
            except CheckpointError as exc:
                if self.resume != "auto":
                    raise CheckpointError(f"{exc}; {_older_hint(checkpoint, '--resume ')}") from None
                print(f"{PROG}: skipping damaged checkpoint {checkpoint}: {exc}", file=sys.stderr)
                continue
            s = self.settings
            apply_optimizer_settings(optimizer, scheduler, lr=s["lr"], betas=s["betas"])
            optimizer.param_groups[0]["weight_decay"] = s["weight_decay"]  # group 1 (1-D params) never decays
            step = int(state["step"])
            keep_until(self.log_path, step, prog=PROG)
            print(f"{PROG}: resuming from {checkpoint} (step {step})", file=sys.stderr)
            return {"step": step, **state["extra"]}
        if self.resume == "auto" and checkpoints(self.folder):
            raise CheckpointError(
                f"no intact checkpoint under {self.folder / 'checkpoints'} (each one is damaged, see above): rerun "
                f"with --resume off to start over"
            )
        keep_until(self.log_path, 0, prog=PROG)
        return None

    def _check(self, checkpoint: Path, before: dict) -> None:
        now, shown = _plain(self.settings), []
        for key in sorted(set(before) | set(now)):
            old, new = before.get(key), now.get(key)
            if old == new:
                continue
            kind, why = SFT_RESUME_SETTINGS.get(key, (APPLY, ""))
            if kind == REFUSE:
                raise ResumeError(
                    f"cannot resume {checkpoint} with {key} changed ({old!r} -> {new!r}): {why}; set it back, or "
                    f"start over with --resume off"
                )
            if kind != QUIET:
                shown.append(f"{key}: {old!r} -> {new!r}")
        if shown:
            print(f"{PROG}: resuming {checkpoint} with changed settings (applied): {', '.join(shown)}", file=sys.stderr)

    def log(self, record: dict) -> None:
        if self._log is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8")
        with storage_errors("", self.log_path):
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()
        if self.on_log is not None:
            self.on_log(record)

    def after_step(self, step: int, total: int, *, model, optimizer, scheduler, rng, order: list[int]) -> None:
        """Checkpoint after `step` every `save_steps` steps (not after the last: the final output follows)."""
        if self.save_steps <= 0 or step % self.save_steps or step >= total:
            return
        save_checkpoint(
            self.folder,
            step,
            model=model,
            tokenizer=self.tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            generator=None,
            data_position={"conversations_left_in_queue": len(order)},
            config=_plain(self.settings),
            extra={"rng": rng.getstate(), "order": list(order)},
            keep_last_n=self.keep_last_n,
            prog=PROG,
        )

    def finish(self, model) -> None:
        """Write the output whole (model, tokenizer, sft_log.jsonl), then remove the work folder."""
        if self._log is not None:
            self._log.close()
            self._log = None
        from opd.io import replace_dir

        tmp = self.folder / "final.tmp"
        try:
            with storage_errors("--output", self.output):
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
                if self.log_path.exists():
                    shutil.copyfile(self.log_path, tmp / "sft_log.jsonl")
                replace_dir(tmp, self.output)  # --overwrite: the old output stays until the new one is in place
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


__all__ = ["SFT_RESUME_SETTINGS", "SFTRun", "data_fingerprint", "partial_dir"]
