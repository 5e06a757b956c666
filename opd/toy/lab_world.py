"""The lab world: 2-digit addition with two thinking patterns, real ambiguity inside each, and two prompt templates.

Why another world: in the demo's world the teacher is nearly deterministic, so its top-k beyond the top-1 token is
noise and the overlap dynamics say nothing. Here every step can be written several equally valid ways (operand
orders; `+`, ` plus ` or ` and `; `=`, ` is ` or ` makes `), chosen uniformly when training data is written, so a
teacher trained on it has genuine entropy and its top-k carries meaning. The two patterns reach the same
`\\boxed{SUM}` by different routes, which is what the paper's pattern-compatibility findings need:

    57 + 68 in columns (right to left, carries)     in partial sums (left to right, place values)
        7+8+0=15                                         50+60=110
        5 plus 6 plus 1 is 12                            8 plus 7 is 15
        \\boxed{125}                                      110 and 15 makes 125
                                                         \\boxed{125}

A teacher that spread its probability evenly over the valid variants would have 0.36 nats per response token in
columns and 0.24 in partial sums (lab tokenizer, 320 tokens; `ideal_entropy`): the upper bound of what training
on this data can give.

Each problem can be asked in two templates ("What is 57 + 68?" and "Compute the sum of 57 and 68."), so a teacher
trained on one template meets the other as unfamiliar prompts (the paper's teacher-aligned prompt selection).
Every written solution is checked step by step by `verify`, and its answer by the project's rule grader.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass

from opd.toy.task import draw_pairs

N_DIGITS = 2
PATTERNS = ("columns", "partial")
TEMPLATES = ("what_is", "sum_of")
PLUS = ("+", " plus ", " and ")
EQUALS = ("=", " is ", " makes ")

_TERM = r"(\d+)"
_OP = "(?:" + "|".join(map(re.escape, PLUS)) + ")"
_EQ = "(?:" + "|".join(map(re.escape, EQUALS)) + ")"
_LINE = re.compile(rf"^{_TERM}{_OP}{_TERM}(?:{_OP}{_TERM})?{_EQ}{_TERM}$")
_BOX = re.compile(r"^\\boxed\{(\d+)\}$")


@dataclass(frozen=True)
class LabProblem:
    a: int
    b: int
    template: str = "what_is"

    def __post_init__(self) -> None:
        hi = 10**N_DIGITS
        if not (0 <= self.a < hi and 0 <= self.b < hi):
            raise ValueError(f"operands must be in [0, {hi}); got a={self.a}, b={self.b}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r} is not valid; allowed: {', '.join(TEMPLATES)}")

    @property
    def question(self) -> str:
        a, b = f"{self.a:0{N_DIGITS}d}", f"{self.b:0{N_DIGITS}d}"
        return f"What is {a} + {b}?" if self.template == "what_is" else f"Compute the sum of {a} and {b}."

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    def messages(self, solution: str | None = None) -> list[dict[str, str]]:
        msgs = [{"role": "user", "content": self.question}]
        if solution is not None:
            msgs.append({"role": "assistant", "content": solution})
        return msgs


def _step(terms: list[int], total: int, rng: random.Random) -> str:
    """One line: the terms in a random order joined by random synonyms (the within-pattern ambiguity)."""
    order = rng.sample(terms, len(terms))
    text = str(order[0])
    for t in order[1:]:
        text += rng.choice(PLUS) + str(t)
    return text + rng.choice(EQUALS) + str(total)


def steps(problem: LabProblem, pattern: str) -> list[tuple[list[int], int]]:
    """The pattern's steps as (terms, total), in order: what every valid text of it writes, in some wording."""
    a, b = problem.a, problem.b
    if pattern == "columns":
        da, db = f"{a:0{N_DIGITS}d}"[::-1], f"{b:0{N_DIGITS}d}"[::-1]
        out, carry = [], 0
        for x, y in zip(da, db):
            s = int(x) + int(y) + carry
            out.append(([int(x), int(y), carry], s))
            carry = s // 10
        return out
    if pattern == "partial":
        tens, ones = a - a % 10 + b - b % 10, a % 10 + b % 10
        return [([a - a % 10, b - b % 10], tens), ([a % 10, b % 10], ones), ([tens, ones], a + b)]
    raise ValueError(f"pattern={pattern!r} is not valid; allowed: {', '.join(PATTERNS)}")


def solution(problem: LabProblem, pattern: str, rng: random.Random) -> str:
    """A correct step-by-step solution in `pattern`, with its free choices drawn from `rng`."""
    lines = [_step(terms, total, rng) for terms, total in steps(problem, pattern)]
    return "\n".join([*lines, f"\\boxed{{{problem.a + problem.b}}}"])


def _parse(text: str) -> tuple[list[tuple[list[int], int]], int] | None:
    lines = text.strip().split("\n")
    if not lines or not (box := _BOX.match(lines[-1])):
        return None
    written = []
    for line in lines[:-1]:
        m = _LINE.match(line)
        if m is None:
            return None
        *terms, total = [int(g) for g in m.groups() if g is not None]
        written.append((terms, total))
    return written, int(box.group(1))


def verify(text: str, problem: LabProblem) -> str | None:
    """The pattern `text` follows when every step is correct and ends in the right box, else None."""
    parsed = _parse(text)
    if parsed is None or parsed[1] != problem.a + problem.b:
        return None
    written = parsed[0]
    for pattern in PATTERNS:
        gold = steps(problem, pattern)
        if len(gold) == len(written) and all(
            sorted(t) == sorted(g) and s == h for (t, s), (g, h) in zip(written, gold, strict=True)
        ):
            return pattern
    return None


def variants(problem: LabProblem, pattern: str) -> int:
    """How many distinct correct texts `pattern` allows for `problem` (the size of the ambiguity)."""
    count = 1
    for terms, _ in steps(problem, pattern):
        orders = len(set(itertools.permutations(terms)))
        count *= orders * len(PLUS) ** (len(terms) - 1) * len(EQUALS)
    return count


def sample_problems(n: int, seed: int, template: str = "what_is", exclude: set | None = None) -> list[LabProblem]:
    """`n` distinct problems drawn by `seed`, none of them in `exclude` (a set of (a, b))."""
    return [LabProblem(a, b, template) for a, b in draw_pairs(n, seed, N_DIGITS, exclude)]


def corpus(n: int = 1500, seed: int = 4321) -> list[str]:
    """Text of every pattern and template, for training the lab tokenizer."""
    rng = random.Random(seed)
    texts = []
    for p in sample_problems(n, seed):
        for template in TEMPLATES:
            texts.append(LabProblem(p.a, p.b, template).question)
        for pattern in PATTERNS:
            texts.append(solution(p, pattern, rng))
    return texts


def ideal_entropy(pattern: str, tokenizer, n: int = 200, seed: int = 5) -> float:
    """Nats per response token (EOS included) of the uniform distribution over `pattern`'s valid texts."""
    rng = random.Random(seed)
    nats = tokens = 0.0
    for p in sample_problems(n, seed):
        nats += math.log(variants(p, pattern))
        tokens += len(tokenizer.encode(solution(p, pattern, rng))) + 1
    return nats / tokens
