"""Final-answer extraction from a model response, and from a ground truth that holds boxes.

Where the answer is looked for, in order (the first that exists wins; ``Extraction.method`` records which):

``boxed``
    the LAST group of ``\\boxed{...}`` / ``\\fbox{...}``, found by brace matching (nested braces survive, escaped
    ``\\{ \\}`` do not count). A group is a run of boxes separated only by commas, "and"/"or", spacing, math
    delimiters or labels such as ``x_2 =`` (``\\boxed{(2,2)}, \\boxed{(6,2)}``); its answers are joined with
    ", " and compared as one list. Any other word between two boxes ends a group, so ``first \\boxed{3},
    corrected: \\boxed{4}`` answers 4. An unclosed last box (a truncated response) gives no answer.
``answer_line``
    the last ``Answer: ...`` line (the DAPO template asks for one); a sentence in it is reduced to its value
    (``Final Answer: The final answer is $x$. I hope it is correct.`` -> ``x``).
``sentence``
    the last "final answer: ..." or "the answer is ..." anywhere in a line, up to the end of its sentence.
``bare``
    the whole response is nothing but an answer: one math span (``$...$``, ``\\(...\\)``, ``\\[...\\]``) or a
    short formula without words.

Nothing else is read: a response that never states its answer gets none (a format error), even if the right
number appears somewhere in its text. Everything here is a linear scan or an anchored regex on short strings,
so 100k-character or deeply nested inputs cost milliseconds, not a hang.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Extraction", "find_answer", "extract_answer", "extract_boxed", "extract_answer_line", "gt_answer"]

# ``\boxed`` / ``\fbox`` not followed by a letter (so ``\boxedx`` is another macro).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# ``Answer: 42`` on its own line; optional markdown bold, any case ("Final Answer:" too), or ``Answer $9$`` (no
# colon, a math span right after). The value is taken greedily to the end of the line and stripped in Python: a
# lazy ``(.*?)[ \t]*$`` backtracks quadratically on a long run of blanks followed by another character.
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>*#_]*(?:final[ \t]+)?answer[ \t*_]*(?:[:：][ \t*_]*(.*)|[ \t]+((?:\$|\\\(|\\\[).*))$",
    re.IGNORECASE | re.MULTILINE,
)
# "Final Answer: ..." or "the (final) answer is ..." inside a line.
_SENTENCE_RE = re.compile(r"(?:\bfinal[ \t]+answer[ \t*_]*[:：]|\banswer[ \t]+is\b[ \t]*[:：]?)[ \t*_]*", re.IGNORECASE)
# What may stand between two boxes of one group (checked on gaps of at most _MAX_GAP characters).
_SEPARATOR_TOKEN = (
    r"\s|[,;.&]|\$|\\[()\[\]]|\\(?:quad|qquad|[,;:! ])|~|\\\\|and\b|or\b|"
    r"\\(?:text|mbox|mathrm)\s*\{\s*(?:,|and|or)?\s*\}|[A-Za-z](?:_\{?\w{1,3}\}?)?\s*="
)
_GAP_RE = re.compile(rf"(?:{_SEPARATOR_TOKEN})*", re.IGNORECASE)
_MAX_GAP = 60
_MATH_SPAN = re.compile(r"^(?:\$\$(.+)\$\$|\$([^$\n]+)\$|\\\((.+)\\\)|\\\[(.+)\\\])$", re.DOTALL)
# A word of prose in an unboxed response (math names such as \sin are macros, "pi"/"ln"/"log" are allowed).
_WORD = re.compile(r"(?<![\\A-Za-z])(?!(?:pi|ln|log|sin|cos|tan|exp|mod|sqrt|inf)\b)[A-Za-z]{2,}")
_SPLIT_NUMBER = re.compile(r"\d\s+\d")  # "5 5 5" is not one answer
_MAX_BARE = 80
_BARE_PERCENT = re.compile(r"\s*(?:%|percent|pct)$", re.IGNORECASE)


@dataclass(frozen=True)
class Extraction:
    """The final answer found (None: the response states none) and where it came from."""

    answer: str | None
    method: str  # boxed | answer_line | sentence | bare | none | unclosed_box | unfinished_think


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


def _unwrap(content: str) -> str:
    """``\\boxed{\\boxed{8}}`` -> ``8``: a box whose whole content is another box (at most 8 levels)."""
    for _ in range(8):
        m = _BOX_RE.match(content)
        if m is None:
            break
        i = m.end()
        while i < len(content) and content[i] in " \t":
            i += 1
        if i >= len(content) or content[i] != "{" or _match_braces(content, i) != len(content) - 1:
            break
        content = content[i + 1 : -1].strip()
    return content


def _boxes(text: str) -> list[tuple[int, int, str | None]]:
    """Every outermost box as (start, end, content); content None for an unclosed box (then the scan stops)."""
    found: list[tuple[int, int, str | None]] = []
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return found
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            close = _match_braces(text, i)
            if close is None:
                found.append((m.start(), len(text), None))
                return found
            found.append((m.start(), close + 1, _unwrap(text[i + 1 : close].strip())))
            pos = close + 1
        else:  # brace-less form: ``\boxed 5`` up to whitespace or the end of math mode
            b = re.match(r"[^\s$]+", text[i:])
            value = b.group(0).rstrip(".,;") if b else ""
            end = i + (b.end() if b else 0)
            found.append((m.start(), end, value or None))
            if not value:
                return found
            pos = end


def _join(parts: list[str]) -> str | None:
    """Answers of several boxes as one comma list (repeats dropped); None if every box is empty."""
    unique: list[str] = []
    for p in parts:
        if p and p not in unique:
            unique.append(p)
    return ", ".join(unique) or None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{}``/``\\fbox{}`` in ``text``; None if there is none or it is unclosed.

    ``\\boxed 5`` (argument without braces, as some models write) gives the following token.
    """
    boxes = _boxes(text)
    return boxes[-1][2] if boxes else None


def _last_group(text: str, boxes: list[tuple[int, int, str | None]]) -> str | None:
    group = [boxes[-1][2] or ""]
    for k in range(len(boxes) - 1, 0, -1):
        gap = text[boxes[k - 1][1] : boxes[k][0]]
        if len(gap) > _MAX_GAP or _GAP_RE.fullmatch(gap) is None:
            break
        group.append(boxes[k - 1][2] or "")
    return _join(group[::-1])


def _clean_value(value: str) -> str | None:
    """An answer statement reduced to its value: markers, math dollars and a closing sentence removed."""
    value = value.strip().strip("*_").strip()
    lead = re.match(r"(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t]+is\b[ \t]*[:：]?", value, re.IGNORECASE)
    if lead:
        value = value[lead.end() :].strip()
    # the sentence ends at ". " before a capital letter or at "I hope"; a decimal point never ends it
    end = re.search(r"\.\s+(?=[A-Z])|(?<!\s)\s+I hope\b", value)  # lookbehind: linear on blank runs
    if end:
        value = value[: end.start()]
    value = value.strip().rstrip(".").strip()
    span = _MATH_SPAN.match(value)
    if span:
        value = next(g for g in span.groups() if g is not None).strip().rstrip(".").strip()
    elif value.startswith("$") and value.endswith("$") and len(value) >= 2:
        value = value.strip("$").strip().rstrip(".").strip()
    return value or None


def extract_answer_line(text: str) -> str | None:
    """Value of the last ``Answer: ...`` line, stripped of ``$``/bold markers and a closing sentence."""
    last = None
    for last in _ANSWER_LINE_RE.finditer(text):
        pass
    if last is None:
        return None
    if last.group(1) is not None:
        return _clean_value(last.group(1))
    value = last.group(2)
    opener = "\\[" if value.startswith("\\[") else "$$" if value.startswith("$$") else None
    closer = {"\\[": "\\]", "$$": "$$"}.get(opener or "")
    if closer and closer not in value[2:]:  # display math opened after "Answer" and closed on a later line
        close = text.find(closer, last.start(2) + 2)
        if close >= 0:
            value = text[last.start(2) : close + 2]
    return _clean_value(value.replace("\n", " "))


def _sentence(text: str) -> str | None:
    last = None
    for last in _SENTENCE_RE.finditer(text):
        pass
    if last is None:
        return None
    line_end = text.find("\n", last.end())
    return _clean_value(text[last.end() : line_end if line_end >= 0 else len(text)])


def _bare(text: str) -> str | None:
    s = text.strip()
    if not s or len(s) > 4 * _MAX_BARE:
        return None
    s = s.rstrip(".").strip()
    pct = _BARE_PERCENT.search(s)  # "28 percent", "$28$ pct", "28 %"
    suffix = "\\%" if pct else ""
    if pct:
        s = s[: pct.start()].strip()
    span = _MATH_SPAN.match(s)
    if span:
        inner = next(g for g in span.groups() if g is not None).strip()
        if "$" not in inner and "\\(" not in inner and "\\[" not in inner and inner.rstrip(".").strip():
            return inner.rstrip(".").strip() + suffix
        return None
    if not s or len(s) > _MAX_BARE or "\n" in s or "$" in s or _WORD.search(s) or _SPLIT_NUMBER.search(s):
        return None
    return s + suffix


def after_think(text: str) -> str | None:
    """What follows the last ``</think>``; None when a ``<think>`` block never closes (the model did not finish)."""
    close = text.rfind("</think>")
    if close >= 0:
        return text[close + len("</think>") :]
    return None if "<think>" in text else text


def find_answer(text: str, *, only_after_think: bool = False) -> Extraction:
    """The final answer stated in ``text`` and how it was found (see the module docstring for the order)."""
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str response, got {type(text).__name__}")
    if only_after_think:
        rest = after_think(text)
        if rest is None:
            return Extraction(None, "unfinished_think")
        text = rest
    boxes = _boxes(text)
    if boxes:
        if boxes[-1][2] is None:
            return Extraction(None, "unclosed_box")  # a box was started but never closed: no stated answer
        return Extraction(_last_group(text, boxes), "boxed")
    for method, finder in (("answer_line", extract_answer_line), ("sentence", _sentence), ("bare", _bare)):
        value = finder(text)
        if value is not None:
            return Extraction(value, method)
    return Extraction(None, "none")


def extract_answer(text: str, *, only_after_think: bool = False) -> str | None:
    """The final answer stated in ``text`` (last box group, ``Answer:`` line, answer sentence, bare answer)."""
    return find_answer(text, only_after_think=only_after_think).answer


def gt_answer(ground_truth: str) -> str:
    """The reference answer: every box of a ground truth that holds boxes (joined); for one without boxes
    the answer its ``Answer:`` line or "answer is" sentence states; else the text itself.

    A reference with several boxes (``\\boxed{2}, \\boxed{3}``) means all of them, never just the last.
    """
    if "\\boxed" not in ground_truth and "\\fbox" not in ground_truth:
        found = find_answer(ground_truth)
        if found.method in ("answer_line", "sentence") and found.answer:
            return found.answer  # a worked solution or "answer is 0.5" as the reference: its stated answer
        return ground_truth.strip()
    parts = [b[2] for b in _boxes(ground_truth) if b[2] is not None]
    return _join(parts) or ground_truth.strip()
