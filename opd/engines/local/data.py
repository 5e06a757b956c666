"""Prompt loading for the local engine: RL parquet -> chat-template token ids, tokenised once, in a fixed order.

Rows follow the verl RL schema (docs/workflow.md §1: `prompt` messages + `reward_model.ground_truth` + `data_source`);
evaluation files may instead carry plain problem/answer columns, the ones `opd eval gen` reads (any case, e.g. an AIME
upload's Problem/Answer; `opd.data.schema.resolve_problem_columns`), as parquet, JSON or JSONL; the raw problem is
the user turn. RL files are validated by `opd.data.schema` (errors name file, row and column). Prompts longer than
`max_prompt_length` tokens are dropped and counted.

The training order is a per-epoch permutation drawn from the seed, read MINI_BATCH_SIZE prompts per step (an epoch's
last partial batch is dropped), so the batch of step s is a pure function of (seed, s): a resumed run reads exactly
the prompts the uninterrupted run would have read. A checkpoint records the data position as prompts consumed
(epoch, prompts used in it), not as a batch index, so a run resumed with another MINI_BATCH_SIZE continues right
after the last prompt used (`PromptSchedule(..., start=...)`) instead of re-reading or skipping prompts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opd.generation import render_prompt_ids


@dataclass(frozen=True)
class Problem:
    prompt_ids: tuple[int, ...]
    ground_truth: str
    data_source: str
    index: int  # row number in the source file


@dataclass
class PromptSet:
    path: str
    problems: list[Problem]
    dropped_too_long: int


def _read_rows(path: Path) -> list[dict]:
    """[{messages, ground_truth, data_source}] from an RL file or a problem/answer file; clear errors otherwise."""
    from opd.data.io import iter_records
    from opd.data.schema import (
        PROBLEM_LAYOUT,
        DataError,
        cell_text,
        read_rl_parquet,
        resolve_problem_columns,
        validate_rl_rows,
    )

    rows = None
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            cols = list(pq.read_schema(path).names)
        except Exception as exc:
            raise DataError(f"not a readable parquet file ({exc})", file=path) from exc
    else:
        rows = list(iter_records(path))  # JSON / JSONL (other suffixes: an error naming the supported ones)
        cols = list(rows[0]) if rows else []
    if "prompt" in cols or "reward_model" in cols:
        if rows is None:
            rows = read_rl_parquet(path)  # validates every row, naming file / row / column
        else:
            validate_rl_rows(rows, path)
        return [
            {
                "messages": [dict(m) for m in row["prompt"]],
                "ground_truth": row["reward_model"]["ground_truth"],
                "data_source": row["data_source"],
            }
            for row in rows
        ]
    question_col, answer_col = resolve_problem_columns(cols)
    if question_col is None or answer_col is None:
        raise DataError(
            f"expected the RL schema (columns prompt, reward_model, ...; docs/workflow.md §1) or problem/answer "
            f"columns ({PROBLEM_LAYOUT}); found {sorted(cols)}",
            file=path,
        )
    out = []
    for i, row in enumerate(rows if rows is not None else iter_records(path)):
        cells = {}
        for role, col in (("question", question_col), ("answer", answer_col)):
            try:
                cells[role] = cell_text(row.get(col))
            except TypeError as exc:
                raise DataError(str(exc), file=path, row=i, column=col) from None
            if cells[role] is None:
                raise DataError(f"empty {role}", file=path, row=i, column=col)
        out.append(
            {
                "messages": [{"role": "user", "content": cells["question"]}],
                "ground_truth": cells["answer"],
                "data_source": str(row.get("data_source") or path.stem),
            }
        )
    return out


def load_prompt_set(
    path: str, tokenizer, *, max_prompt_length: int, template_kwargs: dict, limit: int | None = None
) -> PromptSet:
    """Read and tokenise one prompt file once (rendered with the student's chat template)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"prompt file {path} does not exist (TRAIN_DATASET / TEST_FILE); write one with `opd data prepare`, "
            f"or run `opd demo` for a toy world"
        )
    rows = _read_rows(file)
    if limit is not None:
        rows = rows[:limit]
    problems, dropped = [], 0
    for i, row in enumerate(rows):
        ids = render_prompt_ids(tokenizer, row["messages"], **template_kwargs)
        if len(ids) > max_prompt_length:
            dropped += 1
            continue
        problems.append(Problem(tuple(ids), row["ground_truth"], row["data_source"], i))
    if not problems:
        raise ValueError(f"{path}: no usable prompt ({dropped} longer than max_prompt_length={max_prompt_length})")
    return PromptSet(str(path), problems, dropped)


def prompts_fingerprint(problems: list[Problem]) -> str:
    """sha256 of the usable prompts' token ids and answers in order: a resumed run must read the same prompts (the
    same file, length filter, chat template and tokenizer), whatever the paths are called."""
    h = hashlib.sha256()
    for p in problems:
        h.update(np.asarray(p.prompt_ids, dtype=np.int64).tobytes())
        h.update(b"\0" + p.ground_truth.encode("utf-8") + b"\0")
    return h.hexdigest()


class PromptSchedule:
    """Which problems step s trains on: epoch-wise permutations from the seed, `batch_size` prompts per step; what is
    left of an epoch when fewer than `batch_size` prompts remain is dropped.

    `start` = (step, {"epoch": e, "prompts_in_epoch": k}) anchors the schedule at a resumed checkpoint: step+1 reads
    the permutation of epoch e from prompt k on, whatever batch size consumed the first k. Without it the anchor is
    (0, epoch 0, prompt 0), which gives the same batches as any later anchor taken from this schedule."""

    def __init__(
        self,
        n_problems: int,
        batch_size: int,
        seed: int,
        total_epochs: int,
        total_steps: int | None,
        start: tuple[int, dict] | None = None,
    ):
        if n_problems < batch_size:
            raise ValueError(
                f"the training set has {n_problems} usable prompts, fewer than MINI_BATCH_SIZE={batch_size}"
            )
        self.n, self.batch_size, self.seed = n_problems, batch_size, seed
        self.steps_per_epoch = n_problems // batch_size
        step0, where = start if start is not None else (0, {"epoch": 0, "prompts_in_epoch": 0})
        self._step0, self._epoch0, self._k0 = int(step0), int(where["epoch"]), int(where["prompts_in_epoch"])
        self._left0 = max(0, (n_problems - self._k0) // batch_size)  # steps left in the anchor's epoch
        if self._epoch0 < total_epochs:
            steps = self._step0 + self._left0 + (total_epochs - 1 - self._epoch0) * self.steps_per_epoch
        else:
            steps = self._step0
        self.total_steps = min(steps, total_steps) if total_steps else steps
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def cursor(self, step: int) -> dict:
        """Data position *before* step `step` (1-based): {"epoch", "prompts_in_epoch"} (prompts consumed)."""
        done = step - 1 - self._step0
        if done < 0:
            raise ValueError(f"step {step} comes before this schedule's start (step {self._step0 + 1})")
        if done < self._left0:
            return {"epoch": self._epoch0, "prompts_in_epoch": self._k0 + done * self.batch_size}
        done -= self._left0
        return {
            "epoch": self._epoch0 + 1 + done // self.steps_per_epoch,
            "prompts_in_epoch": (done % self.steps_per_epoch) * self.batch_size,
        }

    def position(self, step: int) -> dict:
        """Data position *before* step `step` as {"epoch", "batch_in_epoch"} (batches of this schedule's size)."""
        where = self.cursor(step)
        return {"epoch": where["epoch"], "batch_in_epoch": where["prompts_in_epoch"] // self.batch_size}

    def batch(self, step: int) -> list[int]:
        where = self.cursor(step)
        start = where["prompts_in_epoch"]
        return self._perm(where["epoch"])[start : start + self.batch_size].tolist()
