"""Validity rules for teacher rollouts used as SFT data (docs/workflow.md §3), checked in a fixed order.

A response is rejected (and re-sampled) for the first rule it breaks:
  no_boxed          no complete \\boxed{...} (same extraction as the grader, so an unclosed box counts as none);
  repeated_line     some line with >= 20 non-blank characters occurs >= 5 times;
  repeated_window   (texts >= 300 chars) a 100-character window, taken at stride 10, occurs >= 3 times anywhere
                    in the text (overlapping occurrences counted, so a loop is caught whatever its period);
  repeated_block    (texts > 5000 chars) a 50-character block repeats >= 3 times back to back, at any offset.
The last three catch the degenerate loops that long sampled generations fall into; training a student on them
teaches it to loop.
"""

from __future__ import annotations

import collections
import re

from opd.grading.extract import extract_boxed

REASONS = ("no_boxed", "repeated_line", "repeated_window", "repeated_block")

LINE_MIN_CHARS, LINE_MAX_REPEATS = 20, 5
WINDOW_MIN_TEXT, WINDOW, WINDOW_STRIDE, WINDOW_MAX_REPEATS = 300, 100, 10, 3
BLOCK_MIN_TEXT, BLOCK, BLOCK_MAX_REPEATS = 5000, 50, 3

_BLOCK_RE = re.compile(r"(.{%d})\1{%d}" % (BLOCK, BLOCK_MAX_REPEATS - 1), re.DOTALL)


def has_repeated_line(text: str) -> bool:
    counts = collections.Counter(
        line.strip() for line in text.splitlines() if sum(not c.isspace() for c in line) >= LINE_MIN_CHARS
    )
    return any(n >= LINE_MAX_REPEATS for n in counts.values())


def _count_overlapping(text: str, sub: str, stop_at: int) -> int:
    n, i = 0, text.find(sub)
    while i != -1:
        n += 1
        if n >= stop_at:
            break
        i = text.find(sub, i + 1)
    return n


def has_repeated_window(text: str) -> bool:
    if len(text) < WINDOW_MIN_TEXT:
        return False
    checked: set[str] = set()
    for start in range(0, len(text) - WINDOW + 1, WINDOW_STRIDE):
        w = text[start : start + WINDOW]
        if w in checked:
            continue
        checked.add(w)
        if _count_overlapping(text, w, WINDOW_MAX_REPEATS) >= WINDOW_MAX_REPEATS:
            return True
    return False


def has_repeated_block(text: str) -> bool:
    return len(text) > BLOCK_MIN_TEXT and _BLOCK_RE.search(text) is not None


def rejection_reason(text: str) -> str | None:
    """The first rule (in REASONS order) that `text` breaks, or None when it is valid SFT data."""
    if extract_boxed(text) is None:
        return "no_boxed"
    if has_repeated_line(text):
        return "repeated_line"
    if has_repeated_window(text):
        return "repeated_window"
    if has_repeated_block(text):
        return "repeated_block"
    return None
