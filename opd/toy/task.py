"""The toy world's task: 3-digit addition with a step-by-step, right-to-left solution that ends in \\boxed{SUM}.

Why this task: its answer is verifiable by the same rule grader as real math benchmarks (last \\boxed{}), a tiny
model can learn it in a couple of CPU minutes, and its difficulty has a clear knob (the carries), so a weak student
and a strong teacher are easy to make (docs/demo.md has the measured calibration).

Format (operands zero-padded so every prompt has the same length, which keeps batches free of padding):

    user:       What is 057 + 768?
    assistant:  7+8+0=15
                5+6+1=12
                0+7+1=8
                \\boxed{825}

One line per column, ones first: `a+b+carry_in=s`; the carry into the next column is the tens digit of `s`, and the
last line's `s` (carry included) is the leading part of the sum.

Why 3 digits (the toy-world calibration used 4): every stage is a quarter cheaper, which is what lets the whole demo
fit its time budget on a slow 2-core host; the task keeps every ingredient (copying operands by position, carries,
writing the sum back in reverse order into the box).

Problems are drawn by `random.Random(seed)`, so a seed fully determines every split; splits never share a problem.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

N_DIGITS = 3
DATA_SOURCE = "toy_add"
SPLITS = ("train", "dev", "test")


def check_operands(a: int, b: int) -> None:
    if not (0 <= a < 10**N_DIGITS and 0 <= b < 10**N_DIGITS):
        raise ValueError(f"operands must be in [0, {10**N_DIGITS}) ({N_DIGITS} digits); got a={a}, b={b}")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    def __post_init__(self) -> None:
        check_operands(self.a, self.b)

    @property
    def question(self) -> str:
        return f"What is {self.a:0{N_DIGITS}d} + {self.b:0{N_DIGITS}d}?"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def solution(self) -> str:
        return gold_solution(self.a, self.b)

    def messages(self, with_answer: bool = False) -> list[dict[str, str]]:
        msgs = [{"role": "user", "content": self.question}]
        if with_answer:
            msgs.append({"role": "assistant", "content": self.solution})
        return msgs


def gold_solution(a: int, b: int) -> str:
    """The reference step-by-step answer: one `x+y+carry=s` line per column, right to left, then the boxed sum."""
    check_operands(a, b)
    da, db = f"{a:0{N_DIGITS}d}"[::-1], f"{b:0{N_DIGITS}d}"[::-1]
    lines, carry = [], 0
    for x, y in zip(da, db):
        s = int(x) + int(y) + carry
        lines.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    lines.append(f"\\boxed{{{a + b}}}")
    return "\n".join(lines)


def draw_pairs(n: int, seed: int, n_digits: int, exclude: set[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """`n` distinct operand pairs of `n_digits` digits drawn uniformly by `seed`, none of them in `exclude`."""
    hi = 10**n_digits - 1
    if n > (hi + 1) ** 2 - len(exclude or ()):
        raise ValueError(f"cannot draw {n} distinct {n_digits}-digit problems")
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[tuple[int, int]] = []
    while len(out) < n:
        key = (rng.randint(0, hi), rng.randint(0, hi))
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def sample_problems(n: int, seed: int, exclude: set[tuple[int, int]] | None = None) -> list[Problem]:
    """`n` distinct problems drawn uniformly by `seed`, none of them in `exclude` (to keep splits disjoint)."""
    return [Problem(*key) for key in draw_pairs(n, seed, N_DIGITS, exclude)]


def make_splits(seed: int, n_train: int, n_dev: int, n_test: int) -> dict[str, list[Problem]]:
    """Disjoint train/dev/test problem lists; test and dev are drawn first so they do not depend on `n_train`."""
    sizes = {"test": n_test, "dev": n_dev, "train": n_train}
    taken: set[tuple[int, int]] = set()
    out: dict[str, list[Problem]] = {}
    for offset, split in enumerate(sizes):
        probs = sample_problems(sizes[split], seed=seed * 1000 + offset, exclude=taken)
        taken.update((p.a, p.b) for p in probs)
        out[split] = probs
    return {s: out[s] for s in SPLITS}


def rl_rows(problems: list[Problem], split: str, data_source: str = DATA_SOURCE) -> list[dict]:
    """Rows in the RL parquet schema (docs/workflow.md §1); any problem with `messages()`, `answer` and `question`."""
    return [
        {
            "data_source": data_source,
            "prompt": p.messages(),
            "ability": "math",
            "reward_model": {"ground_truth": p.answer, "style": "rule"},
            "extra_info": {"index": i, "split": split, "question": p.question},
        }
        for i, p in enumerate(problems)
    ]


def write_parquet(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write rows atomically (temp file + os.replace), so a crash never leaves a half-written parquet."""
    import pandas as pd

    from opd.io import atomic_path

    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    return Path(path)


def write_datasets(
    out_dir: str | os.PathLike, seed: int = 0, n_train: int = 20000, n_dev: int = 200, n_test: int = 500
) -> dict[str, Path]:
    """Write `{train,dev,test}.parquet` under `out_dir`; returns the paths by split."""
    splits = make_splits(seed, n_train, n_dev, n_test)
    return {s: write_parquet(rl_rows(probs, s), Path(out_dir) / f"{s}.parquet") for s, probs in splits.items()}


def sft_messages(problems: list[Problem]) -> list[dict]:
    """ShareGPT-style records (`{"messages": [...]}`) with the gold answers, as `opd rollout` would write them."""
    return [{"messages": p.messages(with_answer=True)} for p in problems]


def corpus(n: int = 2000, seed: int = 12345) -> list[str]:
    """Task text (questions and gold solutions) used to train the toy tokenizer."""
    texts = []
    for p in sample_problems(n, seed):
        texts.append(p.question)
        texts.append(p.solution)
    return texts
