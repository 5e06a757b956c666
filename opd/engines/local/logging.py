"""Run outputs written while training: metrics.jsonl (one JSON line per step), TensorBoard events, profiles.jsonl
(per-position profiles) and samples.jsonl (a few decoded rollouts per step with their rule reward).

metrics.jsonl is the machine-readable record the report and the demo read: `{"step": s, <key>: <float>, ...}`,
one line per step (step 0: validation before training). Non-finite values are written as null. On resume the
lines after the checkpoint's step are dropped (they belong to the interrupted tail that is about to be redone) and
TensorBoard purges its events after that step, so both logs read as one uninterrupted run. A torn last line (a kill
in the middle of an append, possibly inside a multi-byte character) is cut off first, with one line saying so; a
damaged line further up is an error naming the file and line.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from opd.io import atomic_write_text, json_safe, repair_torn_tail


class RunLogger:
    def __init__(self, run_dir: Path, *, start_step: int, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.profiles_path = self.run_dir / "profiles.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        for path in (self.metrics_path, self.profiles_path, self.samples_path):
            keep_until(path, start_step)
        self._metrics = open(self.metrics_path, "a")
        self._profiles = None
        self._samples = None
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step > 0 else None
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: json_safe(float(v)) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if math.isfinite(float(value)):
                    self._tb.add_scalar(key, float(value), step)

    def log_profile(self, step: int, profile: dict) -> None:
        """Per-position arrays (lists) for the report's 'vs position' plots."""
        if self._profiles is None:
            self._profiles = open(self.profiles_path, "a")
        self._profiles.write(json.dumps({"step": step, **profile}) + "\n")
        self._profiles.flush()

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """A few decoded rollouts with their rule reward, to read what the student writes."""
        if self._samples is None:
            self._samples = open(self.samples_path, "a")
        for sample in samples:
            self._samples.write(json.dumps({"step": step, **sample}) + "\n")
        self._samples.flush()

    def close(self) -> None:
        self._metrics.close()
        for handle in (self._profiles, self._samples):
            if handle is not None:
                handle.close()
        if self._tb is not None:
            self._tb.close()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def keep_until(path: Path, step: int, *, prog: str = "opd train") -> None:
    """Keep only the lines of `path` with step <= `step` (all gone for a fresh start); atomic rewrite. A torn last
    line is dropped first (said in one line); any other unreadable line is a ValueError naming file and line."""
    if not path.exists():
        return
    dropped = repair_torn_tail(path, is_complete=_is_json)
    if dropped:
        print(f"{prog}: {path}: removed a torn last line ({dropped} bytes, an interrupted write)", file=sys.stderr)
    kept = []
    if step > 0:
        for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                row_step = json.loads(line).get("step", 0)
            except (ValueError, AttributeError) as exc:  # UnicodeDecodeError is a ValueError
                raise ValueError(
                    f"{path}, line {number}: not a JSON object ({exc}); delete that line to resume"
                ) from None
            if row_step <= step:
                kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
