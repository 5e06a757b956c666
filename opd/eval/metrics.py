"""Benchmark metrics as pure functions of per-example rollouts (no I/O), so they are testable by hand.

For one file with N samples per problem: mean_score = avg@N (mean over problems of the fraction of correct
samples), best_score = pass@N (fraction of problems with at least one correct sample), maj_score = maj@N
(the most frequent final answer per problem is graded; ties go to the answer seen first; answers are grouped by
their normalised form, numbers by exact value), solve_none / solve_all (problems with no / only correct samples),
distinct_4gram (per problem: distinct word 4-grams / all word 4-grams over its N responses, averaged over
problems: low values flag repetitive or collapsed sampling), format_error_rollouts (samples without a final
answer) and avg_output_length (mean response length in tokens, when lengths are known).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from opd.grading.normalize import normalize_answer, parse_number

__all__ = ["ExampleRollouts", "answer_key", "majority_index", "majority_score", "distinct_ngram_ratio", "file_metrics"]


@dataclass
class ExampleRollouts:
    """The graded samples of one problem."""

    scores: list[float]
    extracted: list[str | None]
    responses: list[str]


def answer_key(extracted: str | None) -> str | None:
    """Grouping key for majority voting: the exact value for numbers, the normalised string otherwise."""
    if extracted is None:
        return None
    norm = normalize_answer(extracted)
    value = parse_number(norm)
    return f"#{value}" if value is not None else norm


def majority_index(extracted: Sequence[str | None]) -> int | None:
    """Index of the first sample carrying the most frequent answer (None when no sample has an answer)."""
    keys = [answer_key(e) for e in extracted]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == best)


def majority_score(extracted: Sequence[str | None], scores: Sequence[float]) -> float:
    """maj@n of one problem: the score of the majority answer (0 when no sample has an answer). The one definition
    for training validation (val/<source>/maj@n) and `opd eval grade` (maj_score), so the two agree."""
    i = majority_index(extracted)
    return 0.0 if i is None else scores[i]


def distinct_ngram_ratio(texts: Sequence[str], n: int = 4) -> float | None:
    """Distinct word n-grams over all word n-grams in ``texts`` (None when there are none)."""
    grams: Counter = Counter()
    for t in texts:
        words = t.split()
        grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else None


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def file_metrics(examples: Sequence[ExampleRollouts], lengths: Sequence[int] | None = None) -> dict:
    """All metrics of one output file; ``lengths`` are response lengths in tokens (one per sample) if known."""
    if not examples:
        raise ValueError("file_metrics needs at least one example")
    maj = [majority_score(ex.extracted, ex.scores) for ex in examples]
    distinct = [r for r in (distinct_ngram_ratio(ex.responses, 4) for ex in examples) if r is not None]
    counts = [len(ex.scores) for ex in examples]
    return {
        "n_examples": len(examples),
        "n_rollouts": sum(counts),
        "samples_per_example": {"min": min(counts), "max": max(counts)},
        "mean_score": _mean([_mean(ex.scores) for ex in examples]),
        "best_score": _mean([max(ex.scores) for ex in examples]),
        "maj_score": _mean(maj),
        "solve_none": sum(max(ex.scores) == 0.0 for ex in examples),
        "solve_all": sum(min(ex.scores) == 1.0 for ex in examples),
        "distinct_4gram": _mean(distinct),
        "avg_output_length": _mean(list(lengths)) if lengths else None,
        "format_error_rollouts": sum(e is None for ex in examples for e in ex.extracted),
    }
