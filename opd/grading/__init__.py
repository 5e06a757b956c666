"""Rule-based grading of math answers: the one grader behind evaluation and the rule reward (``true_reward``).

``score_response(response, ground_truth) -> 1.0 | 0.0`` is the entry point for engines; ``extract_answer``
finds the final answer (last ``\\boxed{}``/``\\fbox{}``, else an ``Answer:`` line); ``grade_batch`` grades many
responses with a small pool of math-verify worker processes; ``reward.compute_score`` is the same grader with
verl's custom-reward signature. See ``score.py`` for the order of checks.
"""

from .extract import extract_answer, extract_boxed
from .normalize import normalize_answer
from .score import GradeResult, clear_symbolic_cache, grade_answer, grade_batch, grade_response, score_response
from .symbolic import DEFAULT_TIMEOUT_S, SymbolicChecker, SymbolicTimeout

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "GradeResult",
    "SymbolicChecker",
    "SymbolicTimeout",
    "clear_symbolic_cache",
    "extract_answer",
    "extract_boxed",
    "grade_answer",
    "grade_batch",
    "grade_response",
    "normalize_answer",
    "score_response",
]
