"""Checkpoints of a local-engine run: everything needed to continue exactly where a run stopped.

A checkpoint is `<run>/checkpoints/step_<NNNNNN>/` with the student as a Hugging Face folder (`model/`, loadable by
`from_pretrained`, tokenizer included), the optimiser and LR-schedule states, every random state (torch, CUDA,
python, numpy and the rollout sampler's generator) and `trainer_state.json` (step, data position). It is written
to a `.tmp-` folder first and renamed, so a crash mid-save never leaves a half checkpoint that RESUME=auto would pick.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from opd.io import replace_dir

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The finished checkpoint with the highest step under `run_dir` (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    found = [(s, p) for s, p in found if (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def rng_state(generator: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "sampler": generator.get_state(),
    }


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    generator.set_state(state["sampler"])


def save_checkpoint(
    run_dir: Path, step: int, *, model, tokenizer, optimizer, scheduler, generator: torch.Generator, data_position: dict
) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(rng_state(generator), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "data_position": data_position}, indent=2))
    replace_dir(tmp, final)  # re-saving a step (a resumed run) keeps the old copy until the new one is in place
    return final


def load_checkpoint(path: Path, *, model, optimizer, scheduler, generator: torch.Generator) -> dict:
    """Restore the model weights, optimiser, schedule and random states in place; returns trainer_state."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no trainer_state.json)")
    loaded = type(model).from_pretrained(path / "model", dtype=next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    restore_rng(torch.load(path / "rng.pt", weights_only=False), generator)
    return json.loads(state_file.read_text())
