"""Final-answer extraction from a model response.

The answer is the content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``), found by brace matching so nested
braces such as ``\\boxed{\\frac{1}{2}}`` survive; escaped braces ``\\{ \\}`` (LaTeX sets) do not count. Without a
box we fall back to the last ``Answer: ...`` line (the DAPO prompt template asks for one). An unclosed last box
(a truncated response) gives no answer: the model did not finish stating it.

Everything here is a linear scan, so 100k-character or deeply nested inputs cost microseconds, not a hang.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "extract_boxed", "extract_answer_line"]

# ``\boxed`` / ``\fbox`` not followed by a letter (so ``\boxedx`` is another macro).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# ``Answer: 42`` on its own line; optional markdown bold, any case ("Final Answer:" too). The value is taken
# greedily to the end of the line and stripped in Python: a lazy ``(.*?)[ \t]*$`` backtracks quadratically on a
# long run of blanks followed by another character.
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>*#_]*(?:final[ \t]+)?answer[ \t*_]*[:：][ \t*_]*(.*)$", re.IGNORECASE | re.MULTILINE
)


def _match_braces(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (escaped braces skipped), or None if unclosed."""
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character (``\{``, ``\}``, ``\\``)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{}``/``\\fbox{}`` in ``text``; None if there is none or it is unclosed.

    ``\\boxed 5`` (argument without braces, as some models write) gives the following token.
    """
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return None
    i = last.end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        close = _match_braces(text, i)
        if close is None:
            return None
        return text[i + 1 : close].strip()
    # brace-less form: ``\boxed 5`` up to whitespace or the end of math mode
    m = re.match(r"[^\s$]+", text[i:])
    return m.group(0).rstrip(".,;") if m else None


def extract_answer_line(text: str) -> str | None:
    """Value of the last ``Answer: ...`` line, stripped of ``$``/bold markers and a final period."""
    last = None
    for last in _ANSWER_LINE_RE.finditer(text):
        pass
    if last is None:
        return None
    value = last.group(1).strip().strip("*_").strip().rstrip(".").strip()
    if value.startswith("$") and value.endswith("$") and len(value) >= 2:
        value = value.strip("$").strip().rstrip(".").strip()
    return value or None


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text``: last box, else last ``Answer:`` line, else None (a format error)."""
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str response, got {type(text).__name__}")
    if _BOX_RE.search(text):
        boxed = extract_boxed(text)
        if boxed is not None:
            return boxed or None
        return None  # a box was started but never closed: no stated answer
    return extract_answer_line(text)
