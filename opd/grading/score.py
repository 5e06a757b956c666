"""The rule grader: one verdict for a (response, ground truth) pair, used by evaluation and as the RL reward.

Order of checks, cheapest first: extract the final answer (``opd.grading.extract``; no answer = wrong; a
ground truth with several boxes means all of them); normalised string match; word answers compared
case-insensitively (never through sympy, which reads "ab" as a*b == b*a); plain numbers compared exactly as
fractions, then within 1e-6 when one side is a decimal, and a percentage ``p%`` against the other side's ``p``
or ``p/100``; otherwise math-verify in a worker process under a hard timeout, after size caps that refuse huge
exponents/towers/factorials. A check that runs past its timeout is retried once with RETRY_FACTOR times the
budget (a loaded machine must not change a verdict); a refused, twice timed-out or failing symbolic check
grades as wrong, never raises. Finished symbolic verdicts are cached by (answer, ground truth), since the N
samples of a problem often repeat an answer. ``grade_batch`` spreads the symbolic checks of many answers over
a few worker processes. ``only_after_think`` grades only what follows ``</think>``.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from tqdm.auto import tqdm

from .extract import find_answer, gt_answer
from .normalize import (
    MAX_ANSWER_CHARS,
    has_percent,
    is_text_answer,
    latexify,
    normalize_answer,
    numbers_close,
    parse_number,
    safe_for_symbolic,
    text_key,
)
from .symbolic import DEFAULT_TIMEOUT_S, SymbolicChecker, SymbolicTimeout, symbolic_equal

__all__ = ["GradeResult", "grade_answer", "grade_response", "score_response", "grade_batch", "clear_symbolic_cache"]


# Verdicts of finished symbolic checks by (answer, ground truth): the N samples of a problem often repeat an answer.
SYMBOLIC_CACHE_SIZE = 65536
_SYMBOLIC_CACHE: OrderedDict[tuple[str, str], bool] = OrderedDict()
_CACHE_LOCK = threading.Lock()
# A symbolic check that times out is run once more with this many times its budget before it grades wrong.
RETRY_FACTOR = 4.0
_PLAIN_INT = re.compile(r"^-?\d{1,30}$")


@dataclass(frozen=True)
class GradeResult:
    """Verdict plus how it was reached (``method``), so reports can count format errors and timeouts."""

    score: float  # 1.0 correct, 0.0 otherwise
    extracted: str | None  # the final answer found in the response (None: format error)
    method: str  # no_answer | string | text | numeric | percent | symbolic | refused | timeout
    source: str = ""  # where the answer was found: boxed | answer_line | sentence | bare | none | ...
    retried: bool = False  # the symbolic check timed out once and was run again with a longer budget

    @property
    def correct(self) -> bool:
        return self.score == 1.0


def _fast_verdict(pred: str, gt: str) -> tuple[bool, str] | None:
    """Decide without sympy when possible; None means "needs the symbolic check"."""
    if len(pred) > MAX_ANSWER_CHARS or len(gt) > MAX_ANSWER_CHARS:
        return pred.strip() == gt.strip() and bool(gt.strip()), "refused"
    if _PLAIN_INT.match(pred) and _PLAIN_INT.match(gt):  # the common case (AIME, the toy world): no regex pass
        return int(pred) == int(gt), "string" if pred == gt else "numeric"
    n_pred, n_gt = normalize_answer(pred), _normalized_gt(gt)
    if not n_gt:  # an empty reference matches nothing
        return False, "refused"
    if n_pred == n_gt:
        return True, "string"
    if is_text_answer(gt):
        return text_key(pred) == text_key(gt), "text"
    v_pred, v_gt = parse_number(n_pred), parse_number(n_gt)
    if v_pred is not None and v_gt is not None:
        if v_pred == v_gt:
            return True, "numeric"
        p_pct, g_pct = has_percent(pred), has_percent(gt)
        if p_pct != g_pct and (v_pred / 100 if p_pct else v_pred) == (v_gt if p_pct else v_gt / 100):
            return True, "percent"  # 10% == 0.1 (and 10% == 10, the string match above)
        if ("." in n_pred or "." in n_gt) and numbers_close(v_pred, v_gt):
            return True, "numeric"
        return False, "numeric"
    if not n_pred or not safe_for_symbolic(pred) or not safe_for_symbolic(gt):
        return False, "refused"
    return None


def _clean_gt(ground_truth: str) -> str:
    if not isinstance(ground_truth, str):
        ground_truth = str(ground_truth)
    return _gt_answer(ground_truth)


# The N samples of a problem share its reference: its extraction and normal form are computed once.
_gt_answer = lru_cache(maxsize=SYMBOLIC_CACHE_SIZE)(gt_answer)
_normalized_gt = lru_cache(maxsize=SYMBOLIC_CACHE_SIZE)(normalize_answer)


def _symbolic(pred: str, gt: str, timeout: float, checker: SymbolicChecker | None) -> tuple[bool | None, bool]:
    """(verdict or None on a second timeout, whether it was retried): one retry with RETRY_FACTOR x the budget."""
    args = (latexify(pred), latexify(gt))
    try:
        return symbolic_equal(*args, timeout=timeout, checker=checker), False
    except SymbolicTimeout:
        pass
    try:
        return symbolic_equal(*args, timeout=timeout * RETRY_FACTOR, checker=checker), True
    except SymbolicTimeout:
        return None, True


def grade_answer(
    pred: str | None,
    ground_truth: str,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    checker: SymbolicChecker | None = None,
    source: str = "",
) -> GradeResult:
    """Grade an already extracted answer against the ground truth (``source``: where the answer was found)."""
    if pred is None:
        return GradeResult(0.0, None, "no_answer", source or "none")
    gt = _clean_gt(ground_truth)
    fast = _fast_verdict(pred, gt)
    if fast is not None:
        return GradeResult(float(fast[0]), pred, fast[1], source)
    key = (pred, gt)
    with _CACHE_LOCK:
        cached = _SYMBOLIC_CACHE.get(key)
        if cached is not None:
            _SYMBOLIC_CACHE.move_to_end(key)
    retried = False
    if cached is None:
        cached, retried = _symbolic(pred, gt, timeout, checker)
        if cached is None:  # not cached: a later, less loaded try may finish
            return GradeResult(0.0, pred, "timeout", source, retried)
        with _CACHE_LOCK:
            _SYMBOLIC_CACHE[key] = cached
            if len(_SYMBOLIC_CACHE) > SYMBOLIC_CACHE_SIZE:
                _SYMBOLIC_CACHE.popitem(last=False)
    return GradeResult(float(cached), pred, "symbolic", source, retried)


def grade_response(
    response: str,
    ground_truth: str,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    checker: SymbolicChecker | None = None,
    only_after_think: bool = False,
) -> GradeResult:
    """Extract the final answer of ``response`` and grade it."""
    found = find_answer(response, only_after_think=only_after_think)
    return grade_answer(found.answer, ground_truth, timeout=timeout, checker=checker, source=found.method)


def score_response(response: str, ground_truth: str, *, only_after_think: bool = False) -> float:
    """1.0 if the response's final answer equals the ground truth, else 0.0 (the rule reward)."""
    return grade_response(response, ground_truth, only_after_think=only_after_think).score


# Idle worker processes kept between grade_batch calls (a worker costs ~0.5-1 s of imports to start).
_IDLE: list[SymbolicChecker] = []
_IDLE_LOCK = threading.Lock()


def clear_symbolic_cache() -> None:
    """Forget cached symbolic verdicts (benchmarks and tests that must time real checks)."""
    with _CACHE_LOCK:
        _SYMBOLIC_CACHE.clear()


_STARTER: threading.Thread | None = None  # the background start of `start_workers`, while it runs
_IDLE_CHANGED = threading.Condition(_IDLE_LOCK)


def _acquire(n: int) -> list[SymbolicChecker]:
    """Up to `n` idle workers, else new ones. While `start_workers` is still starting some, the first of those is
    waited for and fewer than `n` may be returned: a started worker is nearer to ready than a new one, and a
    duplicate start would compete with it for the CPU."""
    with _IDLE_CHANGED:
        while not _IDLE and _STARTER is not None and _STARTER.is_alive():
            _IDLE_CHANGED.wait(timeout=0.05)
        taken = [_IDLE.pop() for _ in range(min(n, len(_IDLE)))]
        starting = _STARTER is not None and _STARTER.is_alive()
    if taken and starting:
        return taken
    return taken + [SymbolicChecker() for _ in range(n - len(taken))]


def _release(checkers: list[SymbolicChecker]) -> None:
    with _IDLE_CHANGED:
        _IDLE.extend(checkers)
        _IDLE_CHANGED.notify_all()


def start_workers(n: int) -> None:
    """Start up to `n` idle math-verify workers in a background thread, so that no training step pays a worker's
    start-up; a trainer calls this once at setup. Workers already idle count; a failure is left to the first
    check to report."""
    with _IDLE_LOCK:
        missing = n - len(_IDLE)
    if missing <= 0:
        return

    def run() -> None:
        for _ in range(missing):
            checker = SymbolicChecker()
            try:
                checker.start()
                checker.check("x + 1", "1 + x")  # math-verify's first parse is slow too: pay it here
            except (RuntimeError, SymbolicTimeout):
                checker.close()
                return
            _release([checker])

    global _STARTER
    _STARTER = threading.Thread(target=run, name="opd-grading-start", daemon=True)
    _STARTER.start()


def wait_for_workers(timeout: float | None = None) -> None:
    """Wait until `start_workers`' background start is over (benchmarks that time steady-state steps call it)."""
    starter = _STARTER
    if starter is not None:
        starter.join(timeout)


def grade_batch(
    responses: list[str],
    ground_truths: list[str],
    *,
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool = False,
    only_after_think: bool = False,
) -> list[GradeResult]:
    """Grade many responses: fast paths in this process, symbolic checks over ``workers`` worker processes
    (kept alive between calls, closed at exit)."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"grade_batch: {len(responses)} responses but {len(ground_truths)} ground truths")
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    results: list[GradeResult | None] = [None] * len(responses)
    pending: dict[tuple[str, str], list[int]] = {}  # unique (answer, ground truth) -> the rows that need it
    sources: list[str] = [""] * len(responses)
    for i, (resp, gt) in enumerate(zip(responses, ground_truths)):
        found = find_answer(resp, only_after_think=only_after_think)
        pred, sources[i] = found.answer, found.method
        if pred is None:
            results[i] = GradeResult(0.0, None, "no_answer", found.method)
            continue
        clean = _clean_gt(gt)
        fast = _fast_verdict(pred, clean)
        if fast is not None:
            results[i] = GradeResult(float(fast[0]), pred, fast[1], found.method)
        else:
            pending.setdefault((pred, clean), []).append(i)
    if pending:
        n = min(workers, len(pending))
        checkers = _acquire(n)
        pool: queue.Queue[SymbolicChecker] = queue.Queue()
        for c in checkers:
            pool.put(c)

        def run(key: tuple[str, str]) -> tuple[tuple[str, str], GradeResult]:
            checker = pool.get()
            try:
                return key, grade_answer(key[0], key[1], timeout=timeout, checker=checker)
            finally:
                pool.put(checker)

        try:
            with ThreadPoolExecutor(n) as ex:
                bar = tqdm(total=len(pending), desc="symbolic checks", disable=not progress)
                for key, res in ex.map(run, list(pending)):
                    for i in pending[key]:
                        results[i] = dataclasses.replace(res, source=sources[i])
                    bar.update()
                bar.close()
        finally:
            _release(checkers)
    missing = sum(r is None for r in results)
    if missing:  # cannot happen; guards future edits of the bookkeeping above
        raise RuntimeError(f"grade_batch lost {missing} results")
    return results  # type: ignore[return-value]
