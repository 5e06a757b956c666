"""Tests of opd.grading: the hand-made verdict table, extraction, adversarial inputs and the timeout machinery."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from opd.grading import (
    SymbolicChecker,
    SymbolicTimeout,
    clear_symbolic_cache,
    extract_answer,
    grade_answer,
    grade_batch,
    grade_response,
    score_response,
)
from opd.grading.score import RETRY_FACTOR

sys.path.insert(0, str(Path(__file__).parent))
from grader_cases import CASES  # noqa: E402


def test_case_table_is_large_and_covers_the_required_kinds():
    assert len(CASES) >= 60
    kinds = {c[0] for c in CASES}
    for needed in (
        "fraction",
        "radical",
        "interval",
        "set",
        "tuple",
        "unit",
        "text",
        "latex",
        "no_box",
        "nested",
        "several_boxes",
        "answer_line",
    ):
        assert needed in kinds, needed
    # both verdicts appear in every kind with a wrong-answer case, so a grader that always says 1 fails
    assert sum(c[3] == 0.0 for c in CASES) >= 20


@pytest.mark.parametrize("kind,response,gt,expected", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_case_table(kind, response, gt, expected):
    assert score_response(response, gt) == expected


def test_batch_equals_one_by_one():
    responses = [c[1] for c in CASES]
    gts = [c[2] for c in CASES]
    batch = grade_batch(responses, gts, workers=2)
    single = [grade_response(r, g) for r, g in zip(responses, gts)]
    assert batch == single
    assert [r.score for r in batch] == [c[3] for c in CASES]


def test_batch_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        grade_batch(["a", "b"], ["1"])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a \\boxed{1} b \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
        ("\\boxed{\\boxed{8}}", "8"),  # a box holding only a box (data/rejection.py reads extract_boxed)
        ("\\boxed{1} then \\boxed{2", None),  # last box unclosed: truncated, no answer
        ("\\boxed 5.", "5"),
        ("see \\boxedfoo{3}", None),  # another macro, not a box
        ("Answer: 7\n", "7"),
        ("answer: $x+1$.", "x+1"),
        ("Final Answer: 12", "12"),
        ("The answer is 3", "3"),
        ("We found 3 of them.", None),  # a number in the text is not a stated answer
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),  # the whole response is one math span: a bare answer
        ("-5", "-5"),
        ("Final Answer: The final answer is $\\frac{2}{3}$. I hope it is correct.", "\\frac{2}{3}"),
        ("so x = 4. Final Answer: The final answer is 12,000,023. I hope it is correct.", "12,000,023"),
        ("\\boxed{(2,2)} \\quad \\text{and} \\quad \\boxed{(6,2)}", "(2,2), (6,2)"),
        ("$x_1 = \\boxed{2}$, $x_2 = \\boxed{-3}$", "2, -3"),
        ("\\boxed{1} and finally \\boxed{2}", "2"),  # a word between boxes ends the group
        ("\\boxed{7}\n\n**Final Answer**\n\\boxed{7}", "7"),
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_rejects_non_string():
    with pytest.raises(TypeError, match="expects a str"):
        extract_answer(None)  # type: ignore[arg-type]


def test_methods_reported():
    assert grade_response("no box", "1").method == "no_answer"
    assert grade_response("\\boxed{1234}", "1234").method == "string"
    assert grade_response("\\boxed{1235}", "1234").method == "numeric"
    assert grade_response("\\boxed{Tuesday}", "Monday").method == "text"
    assert grade_response("\\boxed{\\sqrt{8}}", "2\\sqrt{2}").method == "symbolic"


ADVERSARIAL = [
    "\\boxed{10^{10^{10^{10}}}}",
    "\\boxed{9^{99999999}}",
    "\\boxed{2**2**2**2**2**2}",
    "\\boxed{100000000!}",
    "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",  # deeply nested braces
    "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
    "\\boxed{" + "1+" * 50000 + "1}",  # 100k characters inside the box
    "x" * 100_000 + "\\boxed{3}",  # 100k-character response (answer wrong)
    "\\boxed{" * 20000,  # never closed
    "{" * 50000 + "\\boxed{4" + "}" * 10,
    "\\boxed{\\sqrt{\\sqrt{\\sqrt{" * 200 + "}" * 600 + "}",
    # regex backtracking traps (each took seconds to minutes before the fixes): blanks after "Answer:",
    # an assignment with blanks before a stray "=", thousands groups, a caret before blanks
    "Answer: 1" + " " * 100_000 + "x",
    "\\boxed{x =" + " " * 100_000 + "=}",
    "\\boxed{1" + ",123" * 25_000 + "x}",
    "\\boxed{2^" + " " * 100_000 + "x}",
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("response", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_inputs_finish_and_grade_wrong(response):
    # the bound is enforced by the timeout marker (and each symbolic check by its own 2 s limit)
    res = grade_response(response, "1", timeout=2.0)
    assert res.score == 0.0


def test_checker_kills_and_restarts_on_overrun():
    checker = SymbolicChecker()
    try:
        # a power tower that gets past no cap because we call the checker directly: must time out, not hang
        with pytest.raises(SymbolicTimeout):
            checker.check("10^{10^{10}}", "1", timeout=1.0)
        assert checker._proc is None  # killed
        assert checker.check("\\sqrt{8}", "2\\sqrt{2}", timeout=30.0) is True  # fresh worker
        assert checker.check("\\sqrt{8}", "3", timeout=30.0) is False
    finally:
        checker.close()


def test_timeout_grades_wrong_instead_of_raising():
    checker = SymbolicChecker()
    try:
        checker.check("1", "1", timeout=30.0)  # start the worker outside the measured check
        clear_symbolic_cache()  # an earlier test may have cached this verdict
        res = grade_answer("x^2+2x+1", "(x+1)^2", timeout=1e-4, checker=checker)
        assert res.method == "timeout" and res.score == 0.0
        res = grade_answer("x^2+2x+1", "(x+1)^2", timeout=30.0, checker=checker)
        assert res.method == "symbolic" and res.score == 1.0
    finally:
        checker.close()


def test_symbolic_verdicts_are_cached_but_timeouts_are_not():
    clear_symbolic_cache()
    checker = SymbolicChecker()
    try:
        checker.check("1", "1", timeout=30.0)
        assert grade_answer("3x+3", "3(x+1)", timeout=1e-4, checker=checker).method == "timeout"
        assert grade_answer("3x+3", "3(x+1)", timeout=30.0, checker=checker).score == 1.0
        checker.close()  # a cached verdict needs no worker: none is started again
        assert grade_answer("3x+3", "3(x+1)", timeout=30.0, checker=checker).score == 1.0
        assert checker._proc is None
    finally:
        checker.close()


def test_batch_maps_repeated_answers_back_to_every_row():
    clear_symbolic_cache()
    res = grade_batch(["\\boxed{\\sqrt{12}}"] * 5 + ["\\boxed{\\sqrt{13}}"], ["2\\sqrt{3}"] * 6, workers=2)
    assert [r.score for r in res] == [1.0] * 5 + [0.0]


def test_checker_survives_a_dead_worker():
    checker = SymbolicChecker()
    try:
        assert checker.check("\\frac{2}{4}", "0.5", timeout=30.0)
        checker._proc.kill()
        checker._proc.wait()
        assert checker.check("\\frac{2}{4}", "0.5", timeout=30.0)
        assert checker.restarts == 1
    finally:
        checker.close()


def _check_in_child(checker, q):
    q.put((checker.check("\\sqrt{8}", "2\\sqrt{2}", timeout=60.0), checker._proc is not None))
    checker.close()


def test_forked_child_gets_its_own_worker():
    import multiprocessing as mp

    checker = SymbolicChecker()
    try:
        assert checker.check("\\frac{2}{4}", "0.5", timeout=30.0)
        parent_pid = checker._proc.pid
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_check_in_child, args=(checker, q))
        p.start()
        assert q.get(timeout=120) == (True, True)
        p.join(60)
        assert p.exitcode == 0
        # the child neither used nor killed the parent's worker
        assert checker._proc is not None and checker._proc.pid == parent_pid and checker._proc.poll() is None
        assert checker.check("\\sqrt{8}", "3", timeout=30.0) is False
    finally:
        checker.close()


def test_verl_style_compute_score_uses_the_same_grader():
    from opd.grading.reward import compute_score

    for _, response, gt, expected in CASES[::7]:
        out = compute_score("any_source", response, gt, extra_info={"index": 0})
        assert out["score"] == out["acc"] == expected
        assert out["format_ok"] == float(extract_answer(response) is not None)


class _SlowOnce:
    """A checker stand-in whose first check overruns its budget, as on a loaded machine."""

    def __init__(self) -> None:
        self.budgets: list[float] = []

    def check(self, pred: str, gt: str, timeout: float) -> bool:
        self.budgets.append(timeout)
        if len(self.budgets) == 1:
            raise SymbolicTimeout("busy machine")
        return True


def test_a_timed_out_check_is_retried_once_with_a_longer_budget():
    clear_symbolic_cache()
    slow = _SlowOnce()
    res = grade_answer("x^2+4x+4", "(x+2)^2", timeout=1.0, checker=slow)  # type: ignore[arg-type]
    assert (res.score, res.method, res.retried) == (1.0, "symbolic", True)
    assert slow.budgets == [1.0, 1.0 * RETRY_FACTOR]


def test_twice_timed_out_grades_wrong_and_says_so():
    checker = SymbolicChecker()
    try:
        checker.check("1", "1", timeout=30.0)
        clear_symbolic_cache()
        res = grade_answer("x^2+6x+9", "(x+3)^2", timeout=1e-4, checker=checker)
        assert (res.score, res.method, res.retried) == (0.0, "timeout", True)
    finally:
        checker.close()


@pytest.mark.parametrize(
    "pred,gt,expected,method",
    [
        ("0.0833333333333333", "\\frac{1}{12}", 1.0, "numeric"),  # a decimal within 1e-6 of the fraction
        ("3.33333333", "\\frac{10}{3}", 1.0, "numeric"),
        ("0.0666668", "0.066666793", 1.0, "numeric"),
        ("0.333", "\\frac{1}{3}", 0.0, "numeric"),
        ("1234567.5", "1234568", 0.0, "numeric"),  # absolute tolerance above 1: not a rounding of the integer
        ("1234567", "1234568", 0.0, "numeric"),  # integers are compared exactly
        ("10\\%", "0.1", 1.0, "percent"),
        ("0.1", "10\\%", 1.0, "percent"),
        ("10\\%", "10", 1.0, "string"),
        ("28", "0.28", 0.0, "numeric"),  # no percent sign: no scaling
        ("12, 345", "12345", 0.0, "symbolic"),  # a comma and a blank: a list, not a thousands separator
        ("12,345", "12345", 1.0, "string"),
    ],
)
def test_plain_numbers_and_percentages(pred, gt, expected, method):
    res = grade_answer(pred, gt, timeout=30.0)
    assert (res.score, res.method) == (expected, method)


def test_several_boxes_on_either_side():
    gt = "\\boxed{2}, \\boxed{3}, \\boxed{5}, \\boxed{7}, \\boxed{13}"
    assert score_response("\\boxed{13}", gt) == 0.0  # a reference with several boxes means all of them
    assert score_response("\\boxed{2, 3, 5, 7, 13}", gt) == 1.0
    assert score_response("\\boxed{13}, \\boxed{7}, \\boxed{5}, \\boxed{3}, \\boxed{2}", gt) == 1.0
    assert score_response("$x_1 = \\boxed{2}$ and $x_2 = \\boxed{-3}$", "2, -3") == 1.0
    assert score_response("\\boxed{(2,2)} \\quad \\text{and} \\quad \\boxed{(6,2)}", "(2, 2), (6, 2)") == 1.0
    assert score_response("\\boxed{(6,2)}", "(2, 2), (6, 2)") == 0.0


def test_sympy_syntax_is_compared_as_equations():
    assert score_response("\\boxed{Eq(x**2/16 + y**2/12, 1)}", "Eq(x**2/4 + y**2/3, 1)") == 0.0
    assert score_response("\\boxed{x^2/4 + y^2/3 = 1}", "Eq(x**2/4 + y**2/3, 1)") == 1.0


def test_only_after_think():
    boxed_in_thought = "<think>maybe \\boxed{42}</think> so it is \\boxed{43}"
    assert score_response(boxed_in_thought, "42") == 0.0
    assert score_response("<think>try \\boxed{41}</think> so \\boxed{42}", "42", only_after_think=True) == 1.0
    assert score_response("<think>maybe \\boxed{42}</think> no idea", "42", only_after_think=True) == 0.0
    res = grade_response("<think>still thinking \\boxed{42}", "42", only_after_think=True)
    assert (res.score, res.source) == (0.0, "unfinished_think")
    assert grade_response("\\boxed{42}", "42", only_after_think=True).score == 1.0  # no think block at all


def test_extraction_source_is_recorded():
    assert grade_response("so \\boxed{3}", "3").source == "boxed"
    assert grade_response("work\nAnswer: 3", "3").source == "answer_line"
    assert grade_response("Thus the answer is 3.", "3").source == "sentence"
    assert grade_response("$3$", "3").source == "bare"
    assert grade_response("I give up.", "3").source == "none"
    assert grade_response("\\boxed{3", "3").source == "unclosed_box"
    batch = grade_batch(["$\\sqrt{8}$", "so \\boxed{3}"], ["2\\sqrt{2}", "3"], workers=1)
    assert [r.source for r in batch] == ["bare", "boxed"]


def test_start_workers_fills_the_idle_pool_once():
    import time

    from opd.grading import score as score_module

    with score_module._IDLE_LOCK:
        before = len(score_module._IDLE)
    score_module.start_workers(before + 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with score_module._IDLE_LOCK:
            if len(score_module._IDLE) >= before + 1:
                break
        time.sleep(0.05)
    with score_module._IDLE_LOCK:
        idle = list(score_module._IDLE)
    assert len(idle) == before + 1 and all(c._proc is not None and c._proc.poll() is None for c in idle)
    score_module.start_workers(before + 1)  # already there: nothing new is started
    time.sleep(0.2)
    with score_module._IDLE_LOCK:
        assert len(score_module._IDLE) == before + 1
    out = score_module.grade_batch(["\\boxed{x^2+2x+1}"], ["(x+1)^2"], workers=1)  # a pooled worker answers
    assert out[0].score == 1.0


def test_a_check_during_the_background_start_waits_for_it_instead_of_starting_another(monkeypatch):
    """While `start_workers` is starting workers, grade_batch takes the first started one rather than starting a
    duplicate (which would compete with it for the CPU); the verdict is the same."""
    import threading

    from opd.grading import score as score_module

    created: list[int] = []
    release = threading.Event()

    class FakeChecker:
        def __init__(self):
            created.append(1)

        def start(self):
            release.wait(10)

        def check(self, a, b):
            return True

        def close(self):
            pass

    monkeypatch.setattr(score_module, "_IDLE", [])
    monkeypatch.setattr(score_module, "_STARTER", None)
    monkeypatch.setattr(score_module, "SymbolicChecker", FakeChecker)
    monkeypatch.setattr(score_module, "_SYMBOLIC_CACHE", type(score_module._SYMBOLIC_CACHE)())
    score_module.start_workers(2)
    assert len(created) == 1  # the background thread is starting its first worker
    taken: list = []
    waiter = threading.Thread(target=lambda: taken.extend(score_module._acquire(2)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and len(created) == 1  # waiting for the started worker, not starting a new one
    release.set()
    waiter.join(10)
    score_module.wait_for_workers(10)
    assert not score_module._STARTER.is_alive()
    assert 1 <= len(taken) <= 2 and len(created) == 2  # only the background start's two workers exist
    score_module._release(taken)
