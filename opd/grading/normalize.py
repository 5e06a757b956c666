"""Cheap, in-process answer normalisation and the exact fast paths of the grader.

Most answers (integers, simple fractions, the toy world's ``\\boxed{1234}``) are decided here without sympy:
LaTeX spacing/wrappers are stripped, ``\\dfrac`` becomes ``\\frac``, units and degree/percent signs are
dropped, and pure numbers are compared exactly as fractions, then within a 1e-6 tolerance when one side is
written as a decimal (:func:`numbers_close`). A comma is a thousands separator only in ``1,234,567`` form (no
blank after it, no leading 0), so ``12, 345`` stays a list. Only what survives goes to math-verify
(``opd.grading.symbolic``), behind the size caps in :func:`safe_for_symbolic`.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "normalize_answer",
    "parse_number",
    "numbers_close",
    "has_percent",
    "latexify",
    "is_text_answer",
    "safe_for_symbolic",
]

_UNITS = (
    "units?|square units|sq units|cm|mm|km|m|meters?|metres?|centimeters?|inch(?:es)?|in|feet|foot|ft|yards?|"
    "miles?|mph|km/h|kg|g|grams?|pounds?|lbs?|ounces?|oz|liters?|litres?|l|ml|seconds?|sec|s|minutes?|min|"
    "hours?|hrs?|h|days?|weeks?|months?|years?|degrees?|deg|radians?|rad|dollars?|cents?|people|students|"
    "ways|points?|sq|cm\\^2|m\\^2|cm\\^3|m\\^3|square feet|square inches|square meters|cubic units"
)
_NUMBER_WITH_UNIT = re.compile(rf"^(-?[\d.,/]+)\s*(?:{_UNITS})\.?$", re.IGNORECASE)
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*([^=<>]+)$")
_THOUSANDS = re.compile(r"^-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?$")
_PERCENT = re.compile(r"\\?%|\bpercent(?:age)?\b|\bpct\b", re.IGNORECASE)
_INT_OR_DEC = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)$")
_SIMPLE_FRAC = re.compile(r"^([-+]?)\\frac\{([-+]?\d+)\}\{([-+]?\d+)\}$")
_SLASH_FRAC = re.compile(r"^([-+]?\d+)/([-+]?\d+)$")
_TEXT_ANSWER = re.compile(r"^[A-Za-z][A-Za-z '\-]*[A-Za-z]$")

# Answers longer than this are compared only verbatim: no real final answer is this long, and the regexes below
# are only guaranteed fast on short strings (an ``x = <100k blanks>=`` answer took minutes in _ASSIGNMENT).
MAX_ANSWER_CHARS = 1000
# Size caps that keep sympy away from work that explodes (checked before math-verify sees the answer).
MAX_SYMBOLIC_CHARS = 400
MAX_EXPONENT_DIGITS = 4  # 2^{9999} is fine, 10^{100000} is refused
MAX_BRACE_DEPTH = 24
_POWER_ARG = re.compile(r"(\^|\*\*)\s*\{?\s*[-+]?\(?\s*(\d+)")
_TOWER = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\w+\s*\^|\*\*\s*\w+\s*\*\*")
_BIG_FACTORIAL = re.compile(r"\d{4,}\s*!|\\?(?:factorial|Gamma)\s*[({]\s*\d{4,}")


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer, for exact comparison (whitespace removed)."""
    s = answer.strip()
    # math-mode wrappers
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    s = s.rstrip(".").strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    for spacing in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\quad", "\\qquad"):
        s = s.replace(spacing, " ")
    s = s.replace("\u2212", "-")  # unicode minus sign
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", "")
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", s)
    s = _PERCENT.sub("", s).replace("\\$", "")
    s = s.replace("$", "")  # stray math toggles inside an answer ("12 $ and $13")
    for _ in range(3):  # nested wrappers like \text{\textbf{x}}
        s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = s.strip()
    m = _ASSIGNMENT.match(s)
    if m:
        s = m.group(1).strip()
    m = _NUMBER_WITH_UNIT.match(s)
    if m:
        s = m.group(1)
    # \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d+)", r"\\sqrt{\1}", s)
    if _THOUSANDS.match(s):  # before blanks go: "12, 345" is a list, not 12345
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def parse_number(normalized: str) -> Fraction | None:
    """Exact value of an integer, decimal or integer fraction (``3``, ``-0.25``, ``\\frac{3}{4}``, ``3/4``)."""
    s = normalized
    if len(s) > 2000:
        return None
    try:
        if _INT_OR_DEC.match(s):
            return Fraction(s)
        m = _SIMPLE_FRAC.match(s)
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) == "-" else value
        m = _SLASH_FRAC.match(s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
    except (ValueError, ZeroDivisionError):
        return None
    return None


# Plain numbers that differ by less than this (relative below 1, absolute above) are equal when one side is
# written as a decimal: ``0.0833333333333333`` is 1/12, ``3.33333333`` is 10/3, but 1234567.5 is not 1234568.
NUMERIC_TOLERANCE = Fraction(1, 10**6)


def numbers_close(a: Fraction, b: Fraction) -> bool:
    """True if two plain numbers agree within NUMERIC_TOLERANCE (relative below 1, absolute above)."""
    scale = min(Fraction(1), max(abs(a), abs(b)))
    return abs(a - b) <= NUMERIC_TOLERANCE * scale


def has_percent(answer: str) -> bool:
    """True if the answer carries a percent sign (``10\\%``, ``10%``, ``10 percent``)."""
    return bool(_PERCENT.search(answer))


_POW = re.compile(r"\*\*")
_EQ_CALL = re.compile(r"^\s*Eq\s*\((.*)\)\s*$", re.DOTALL)


def latexify(answer: str) -> str:
    """Python/sympy syntax rewritten as math-verify reads it: ``**`` -> ``^``, ``Eq(a, b)`` -> ``a = b``.

    math-verify's expression parser reads ``Eq(x**2/16 + y**2/12, 1)`` as just ``1``, so two different equations
    would match; as ``x^2/16 + y^2/12 = 1`` it compares the equations.
    """
    s = answer
    m = _EQ_CALL.match(s)
    if m:
        inner, depth = m.group(1), 0
        for i, c in enumerate(inner):
            depth += c in "([{"
            depth -= c in ")]}"
            if c == "," and depth == 0:
                s = f"{inner[:i].strip()} = {inner[i + 1 :].strip()}"
                break
    return _POW.sub("^", s)


def is_text_answer(answer: str) -> bool:
    """True for word answers ("Monday", "No", "Tuesday and Wednesday") that must not be read as products of symbols."""
    s = _TEXT_WRAPPERS.sub(r"\1", answer.strip().strip("$")).strip().rstrip(".")
    return bool(_TEXT_ANSWER.match(s))


def text_key(answer: str) -> str:
    """Comparison key for word answers: wrappers, case, spaces and punctuation removed."""
    s = _TEXT_WRAPPERS.sub(r"\1", answer.strip().strip("$")).strip()
    return re.sub(r"[^a-z0-9]", "", s.lower())


def safe_for_symbolic(answer: str) -> bool:
    """False for inputs that could make sympy hang or eat memory (huge powers, towers, factorials, deep nesting)."""
    if len(answer) > MAX_SYMBOLIC_CHARS:
        return False
    for m in _POWER_ARG.finditer(answer):
        if len(m.group(2)) > MAX_EXPONENT_DIGITS:
            return False
    if _TOWER.search(answer) or _BIG_FACTORIAL.search(answer):
        return False
    depth = max_depth = 0
    for c in answer:
        if c in "{([":
            depth += 1
            max_depth = max(max_depth, depth)
        elif c in "})]":
            depth -= 1
    return max_depth <= MAX_BRACE_DEPTH
