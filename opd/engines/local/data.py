"""Prompt loading for the local engine: RL parquet -> chat-template token ids, tokenised once, in a fixed order.

Rows follow the verl RL schema (workflow.md §2: `prompt` messages + `reward_model.ground_truth` + `data_source`);
evaluation files may instead carry `problem` / `answer` columns. RL files are read and validated by
`opd.data.schema.read_rl_parquet` (errors name file, row and column). Prompts longer than `max_prompt_length`
tokens are dropped and counted.

The training order is a per-epoch permutation drawn from the seed, so the batch of step s is a pure function of
(seed, s): a resumed run reads exactly the prompts the uninterrupted run would have read.
"""

from __future__ import annotations

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
    """[{messages, ground_truth, data_source}] from an RL parquet or a problem/answer file; clear errors otherwise."""
    import pyarrow.parquet as pq

    from opd.data.schema import DataError, read_rl_parquet

    try:
        cols = set(pq.read_schema(path).names)
    except Exception as exc:
        raise DataError(f"not a readable parquet file ({exc})", file=path) from exc
    if "prompt" in cols or "reward_model" in cols:
        return [
            {"messages": [dict(m) for m in row["prompt"]], "ground_truth": row["reward_model"]["ground_truth"],
             "data_source": row["data_source"]}
            for row in read_rl_parquet(path)  # validates every row, naming file / row / column
        ]
    question_col = next((c for c in ("problem", "question") if c in cols), None)
    if question_col is None or "answer" not in cols:
        raise DataError(
            f"expected the RL schema (columns prompt, reward_model, ...; workflow.md §2) or 'problem'/'answer' "
            f"columns; found {sorted(cols)}", file=path)
    out = []
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        question, answer = row[question_col], row["answer"]
        if question is None or not str(question).strip():
            raise DataError("empty question", file=path, row=i, column=question_col)
        if answer is None or not str(answer).strip():
            raise DataError("empty answer", file=path, row=i, column="answer")
        out.append({"messages": [{"role": "user", "content": str(question)}], "ground_truth": str(answer),
                    "data_source": str(row.get("data_source") or path.stem)})
    return out


def load_prompt_set(path: str, tokenizer, *, max_prompt_length: int, template_kwargs: dict,
                    limit: int | None = None) -> PromptSet:
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


class PromptSchedule:
    """Which problems step s trains on: epoch-wise permutations from the seed; the last partial batch is dropped."""

    def __init__(self, n_problems: int, batch_size: int, seed: int, total_epochs: int, total_steps: int | None):
        if n_problems < batch_size:
            raise ValueError(
                f"the training set has {n_problems} usable prompts, fewer than MINI_BATCH_SIZE={batch_size}"
            )
        self.n, self.batch_size, self.seed = n_problems, batch_size, seed
        self.steps_per_epoch = n_problems // batch_size
        steps = self.steps_per_epoch * total_epochs
        self.total_steps = min(steps, total_steps) if total_steps else steps
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def position(self, step: int) -> dict:
        """Data position *before* step `step` (1-based steps): saved in checkpoints."""
        done = step - 1
        return {"epoch": done // self.steps_per_epoch, "batch_in_epoch": done % self.steps_per_epoch}

    def batch(self, step: int) -> list[int]:
        pos = self.position(step)
        start = pos["batch_in_epoch"] * self.batch_size
        return self._perm(pos["epoch"])[start : start + self.batch_size].tolist()
