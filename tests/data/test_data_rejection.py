"""Each rollout validity rule fires on a crafted text, stays quiet just below its threshold, and a clean long
answer passes every rule (docs/workflow.md §3)."""

import random
import string

import pytest

from opd.data import rejection as rj


def noise(n: int, seed: int) -> str:
    """Random words on short distinct lines: no line, window or block repeats."""
    rng = random.Random(seed)
    words = []
    while sum(len(w) + 1 for w in words) < n:
        words.append("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))))
    text, line = [], []
    for w in words:
        line.append(w)
        if len(line) == 8:
            text.append(" ".join(line))
            line = []
    text.append(" ".join(line))
    return "\n".join(text)[:n]


BOX = "\nSo the answer is $\\boxed{\\frac{1}{2}}$."


def test_clean_long_answer_passes():
    text = noise(9000, 0) + BOX
    assert len(text) > rj.BLOCK_MIN_TEXT
    assert rj.rejection_reason(text) is None


@pytest.mark.parametrize("tail", ["no box at all", "unclosed \\boxed{\\frac{1}{2}", "\\boxedfoo{3}"])
def test_no_boxed(tail):
    assert rj.rejection_reason(noise(400, 1) + "\n" + tail) == "no_boxed"


def test_no_boxed_comes_first():
    line = "this line has more than twenty characters"
    assert rj.rejection_reason("\n".join([line] * 6)) == "no_boxed"


@pytest.mark.parametrize("repeats,expected", [(4, None), (5, "repeated_line")])
def test_repeated_line_threshold(repeats, expected):
    line = "  Let us check the case again carefully.  "
    parts = [noise(60, s) for s in range(repeats + 1)]
    text = "".join(p + "\n" + line + "\n" for p in parts[:repeats]) + parts[-1] + BOX
    assert rj.has_repeated_line(text) == (expected is not None)
    assert rj.rejection_reason(text) == expected


def test_short_lines_do_not_count():
    short = "x = 1 + 1 = 2 so it is fine ok"  # 19 characters once spaces are left out
    assert sum(not c.isspace() for c in short) < rj.LINE_MIN_CHARS
    assert not rj.has_repeated_line("\n".join([short] * 10))
    long_spaced = "a b c d e f g h i j k l m n o p q r s t"  # 20 non-blank chars
    assert rj.has_repeated_line("\n".join([long_spaced] * 5))


@pytest.mark.parametrize("copies,expected", [(2, None), (3, "repeated_window")])
def test_repeated_window(copies, expected):
    seg = noise(120, 99).replace("\n", " ")  # 120 chars: some stride-10 window lies inside every copy
    text = " ".join(noise(150, s) + " " + seg for s in range(copies)) + " " + noise(150, 50) + BOX
    assert len(text) >= rj.WINDOW_MIN_TEXT
    assert rj.rejection_reason(text) == expected


def test_repeated_window_needs_300_chars():
    seg = "q" * 99 + "!"  # 100 chars; three copies alone are already 300 chars
    short = (seg * 3)[:299]
    assert not rj.has_repeated_window(short)
    assert rj.has_repeated_window(seg * 3)


def test_repeated_window_any_period():
    """A loop with a period that is not a multiple of the stride is still caught."""
    loop = "We get 37 again, so recheck: " * 12  # period 29
    assert rj.has_repeated_window(noise(200, 3) + loop)


@pytest.mark.parametrize("copies,expected", [(2, None), (3, "repeated_block")])
def test_repeated_block(copies, expected):
    block = noise(50, 7).replace("\n", " ")
    text = noise(3000, 8) + block * copies + noise(3000, 9) + BOX
    assert len(text) > rj.BLOCK_MIN_TEXT
    assert rj.rejection_reason(text) == expected


def test_repeated_block_only_for_long_texts():
    block = noise(50, 7).replace("\n", " ")
    body = block * 3
    filler = noise(rj.BLOCK_MIN_TEXT - len(body) - len(BOX), 11)
    text = filler + body + BOX
    assert len(text) == rj.BLOCK_MIN_TEXT  # not > 5000: rule not applied
    assert rj.rejection_reason(text) is None
    assert rj.rejection_reason("z" + text) == "repeated_block"


def test_block_at_odd_offset():
    block = noise(50, 21).replace("\n", " ")
    text = noise(5003, 22) + block * 3 + BOX
    assert rj.has_repeated_block(text)
