"""Checkpoints of a local-engine run: everything needed to continue exactly where a run stopped.

A checkpoint is `<run>/checkpoints/step_<NNNNNN>/` with the student as a Hugging Face folder (`model/`, loadable by
`from_pretrained`, tokenizer included), the optimiser and LR-schedule states (`optimizer.pt`), every random state
(`rng.pt`: torch, CUDA, python, numpy and the rollout sampler's generator), `trainer_state.json` (step, data
position, the run's settings) and, written last, `manifest.json` (size and sha256 of every other file).

Durability, in order of what can go wrong:
- a kill mid-save: the checkpoint is written to `.tmp-step_<N>/` and renamed when complete (after an fsync), so
  RESUME=auto never picks a half checkpoint; the next run removes the `.tmp-` folder (`clean_unfinished`);
- a damaged file later (a truncated copy, a bad disk): `damage` compares the folder with its manifest before
  anything is loaded, and a load that still fails names the file (`CheckpointError`); checkpoints from before
  manifests are trusted as far as they load;
- a full or read-only disk: the `.tmp-` folder is removed, the earlier checkpoints are left as they were, and the
  error is one `StorageError` line ("no space left on device while writing checkpoint <path>");
- rotation (`keep_last_n`) deletes old checkpoints only after the new one is complete, never the one just written.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from opd.io import MANIFEST, fsync_tree, manifest_problem, replace_dir, storage_errors, write_manifest

_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^\.(tmp|old|del)-step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and what to do instead."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders under `run_dir`, newest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True) if (p / "trainer_state.json").is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The finished checkpoint with the highest step under `run_dir` (temporary folders are ignored)."""
    found = checkpoints(run_dir)
    return found[0] if found else None


def clean_unfinished(run_dir: Path, *, prog: str = "opd train") -> None:
    """Remove what an interrupted save or rotation left in `<run>/checkpoints/`: `.tmp-step_*` (a save that never
    finished), `.del-step_*` (a rotation in progress); an `.old-step_*` whose step folder is missing (a kill between
    the two renames of re-saving a step) is put back, being the complete earlier copy."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        m = _LEFTOVER.match(path.name)
        if not m or not path.is_dir():
            continue
        final = root / f"step_{m.group(2)}"
        if m.group(1) == "old" and not final.exists():
            os.replace(path, final)
            print(f"{prog}: restored {final} from {path.name} (a re-save was interrupted)", file=sys.stderr)
            continue
        shutil.rmtree(path, ignore_errors=True)
        if m.group(1) == "tmp":
            print(f"{prog}: removed {path} (a checkpoint save was interrupted)", file=sys.stderr)


def rng_state(generator: torch.Generator | None) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "sampler": None if generator is None else generator.get_state(),
    }


def restore_rng(state: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if generator is not None:
        generator.set_state(state["sampler"])


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file object: a full disk then raises OSError(ENOSPC) instead of torch's
    "[enforce fail at inline_container.cc]" (tests replace this function to simulate one)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    optimizer,
    scheduler,
    generator: torch.Generator | None,
    data_position: dict,
    config: dict | None = None,
    extra: dict | None = None,
    keep_last_n: int = 0,
    prog: str = "opd train",
) -> Path:
    """Write checkpoint `step` (complete or not at all), then rotate to the newest `keep_last_n` (0: keep all).
    `extra` (picklable) is saved beside the random states, for trainers with more loop state (`opd sft`)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    try:
        with storage_errors("checkpoint", final):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
            _torch_save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt"
            )
            _torch_save({**rng_state(generator), "extra": extra}, tmp / "rng.pt")
            state = {"step": step, "data_position": data_position, "config": config}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            write_manifest(tmp)  # last: a folder with a matching manifest is complete
            fsync_tree(tmp)
            replace_dir(tmp, final)  # re-saving a step (a resumed run) keeps the old copy until the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last_n > 0:
        rotate(run_dir, keep_last_n, keep=final, prog=prog)
    return final


def rotate(run_dir: Path, keep_last_n: int, *, keep: Path, prog: str = "opd train") -> None:
    """Delete all but the newest `keep_last_n` checkpoints (never `keep`). Each is renamed to `.del-` first, so a kill
    mid-delete never leaves a half folder that looks like a checkpoint."""
    for old in checkpoints(run_dir)[keep_last_n:]:
        if old == keep:
            continue
        doomed = old.parent / f".del-{old.name}"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def read_state(path: Path) -> dict:
    """`trainer_state.json` of checkpoint `path`; a missing or unreadable file is a CheckpointError naming it."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no trainer_state.json)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        int(state["step"])
        state["data_position"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{state_file} is damaged ({type(exc).__name__}: {exc})") from None
    return state


def damage(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted ("<file>: <what>", the file inside the checkpoint), or None: its
    manifest (sizes, then sha256) and a readable trainer_state.json. No manifest: only the latter is checked."""
    problem = manifest_problem(path)
    if problem is not None:
        return problem
    try:
        read_state(path)
    except CheckpointError as exc:
        return str(exc)
    return None


def _read(path: Path, what: str, load):
    try:
        return load()
    except Exception as exc:  # safetensors, torch's zip reader and pickle each raise their own kinds
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path / what} cannot be read ({type(exc).__name__}: {first})") from None


def load_checkpoint(path: Path, *, model, optimizer, scheduler, generator: torch.Generator | None) -> dict:
    """Restore the model weights, optimiser, schedule and random states in place; returns trainer_state (with the
    `extra` loop state under "extra"). Every file is read before anything is restored, so a damaged file
    (CheckpointError, naming it) leaves the model and optimiser untouched."""
    path = Path(path)
    state = read_state(path)
    dtype = next(model.parameters()).dtype
    loaded = _read(path, "model", lambda: type(model).from_pretrained(path / "model", dtype=dtype))
    opt = _read(path, "optimizer.pt", lambda: torch.load(path / "optimizer.pt", weights_only=False))
    rng = _read(path, "rng.pt", lambda: torch.load(path / "rng.pt", weights_only=False))
    try:
        model.load_state_dict(loaded.state_dict(), strict=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not fit this model or optimiser ({first})") from None
    del loaded
    restore_rng(rng, generator)
    state["extra"] = rng.get("extra")
    return state


__all__ = [
    "MANIFEST",
    "CheckpointError",
    "checkpoint_dir",
    "checkpoints",
    "latest_checkpoint",
    "clean_unfinished",
    "save_checkpoint",
    "rotate",
    "read_state",
    "damage",
    "load_checkpoint",
]
