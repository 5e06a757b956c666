"""Rule-based grading of math answers: the one grader behind evaluation and the rule reward (``true_reward``).

``score_response(response, ground_truth) -> 1.0 | 0.0`` is the entry point for engines; ``find_answer`` /
``extract_answer`` find the final answer (last group of ``\\boxed{}``, else an ``Answer:`` line, an "the answer
is" sentence or a bare answer; see ``extract.py``); ``grade_batch`` grades many
responses with a small pool of math-verify worker processes; ``reward.compute_score`` is the same grader with
verl's custom-reward signature. See ``score.py`` for the order of checks.
"""

from .extract import Extraction, extract_answer, extract_boxed, find_answer
from .normalize import normalize_answer
from .score import (
    GradeResult,
    clear_symbolic_cache,
    grade_answer,
    grade_batch,
    grade_response,
    score_response,
    start_workers,
    wait_for_workers,
)
from .symbolic import DEFAULT_TIMEOUT_S, SymbolicChecker, SymbolicTimeout

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Extraction",
    "GradeResult",
    "SymbolicChecker",
    "SymbolicTimeout",
    "clear_symbolic_cache",
    "extract_answer",
    "extract_boxed",
    "find_answer",
    "grade_answer",
    "grade_batch",
    "grade_response",
    "normalize_answer",
    "score_response",
    "start_workers",
    "wait_for_workers",
]
