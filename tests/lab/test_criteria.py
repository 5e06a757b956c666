"""Each lab criterion on synthetic curves: it says "reproduced" when the phenomenon is there and not when it is not."""

from __future__ import annotations

import itertools
import random

import pytest

from opd.lab import criteria as C


def curve(first: float, last: float, steps: int = 20, noise: float = 0.0, rng=None) -> list[tuple[int, float]]:
    rng = rng or random.Random(0)
    return [(s, first + (last - first) * s / steps + noise * rng.uniform(-1, 1)) for s in range(steps + 1)]


def run(acc=(0.3, 0.3), other=(0.3, 0.3), ratio=(0.5, 0.5), mass=(0.9, 0.9), kl=(0.5, 0.5)) -> dict:
    return {
        C.ACC: curve(*acc),
        C.ACC_OTHER: curve(*other),
        "opd/overlap_ratio": curve(*ratio)[1:],
        "opd/overlap_mass_student": curve(*mass)[1:],
        "opd/overlap_mass_teacher": curve(*mass)[1:],
        "opd/reverse_kl": curve(*kl)[1:],
    }


def seed(present: bool, jitter: float = 0.0) -> dict:
    """A seed's measurements in which every phenomenon is there (`present`) or none is."""
    j = jitter
    good = run(acc=(0.3, 0.8 + j), other=(0.3, 0.6), ratio=(0.5, 0.7), mass=(0.85, 0.97), kl=(0.5, 0.1))
    if present:
        bad = run(acc=(0.3, 0.35 + j), ratio=(0.5, 0.49), mass=(0.85, 0.85), kl=(0.5, 0.45))
        cold = run(acc=(0.35, 0.78), ratio=(0.55, 0.7))
        peer = run(acc=(0.3, 0.31))
        misaligned = run(acc=(0.3, 0.4), other=(0.3, 0.3), ratio=(0.5, 0.52))
        checks = {"compatible": 0.6, "incompatible": 0.3, "cold_start": 0.55, "peer": 0.7, "misaligned": 0.2}
        peer_acc = 0.31
    else:
        bad = good
        cold = run(acc=(0.3, 0.5))
        peer = good
        misaligned = good
        checks = {"compatible": 0.3, "incompatible": 0.6, "cold_start": 0.5, "peer": 0.4, "misaligned": 0.8}
        peer_acc = 0.2
    return {
        "teachers": {"columns": 0.95, "partial": 0.94},
        "models": {"student": 0.3, "peer": peer_acc},
        "runs": {"compatible": good, "incompatible": bad, "cold_start": cold, "peer": peer, "misaligned": misaligned},
        "checks": {p: {"overlap_ratio": v} for p, v in checks.items()},
    }


@pytest.mark.parametrize("ph", C.PHENOMENA, ids=lambda ph: ph.key)
def test_each_criterion_tells_present_from_absent(ph):
    present = [seed(True, j) for j in (0.0, 0.02, -0.02)]
    absent = [seed(False, j) for j in (0.0, 0.02, -0.02)]
    assert ph.judge(present).reproduced
    if ph.key != "d":  # concentration has no "absent" twin here: see the next test
        assert not ph.judge(absent).reproduced
    assert all(len(v) == 2 for v in ph.judge(present).numbers.values())


def test_concentration_needs_both_masses_above_the_floor():
    seeds = [seed(True)]
    assert C.judge_concentration(seeds).reproduced
    seeds[0]["runs"]["compatible"]["opd/overlap_mass_teacher"] = curve(0.85, 0.8)[1:]
    assert not C.judge_concentration(seeds).reproduced


def test_compatibility_needs_similar_teachers_and_a_gain_on_every_seed():
    seeds = [seed(True) for _ in range(3)]
    assert C.judge_compatibility(seeds).reproduced
    seeds[0]["teachers"]["partial"] = 0.95 - C.TEACHERS_WITHIN - 0.01
    assert not C.judge_compatibility(seeds).reproduced
    seeds = [seed(True) for _ in range(3)]
    seeds[1]["runs"]["incompatible"] = seeds[1]["runs"]["compatible"]  # one seed without the gap
    big = run(acc=(0.3, 1.0))
    for m in (seeds[0], seeds[2]):
        m["runs"]["compatible"] = big  # the mean margin still holds, one seed does not
    assert (
        C.statistics.fmean(C.gain(m["runs"]["compatible"]) - C.gain(m["runs"]["incompatible"]) for m in seeds)
        >= C.COMPAT_MARGIN
    )
    assert not C.judge_compatibility(seeds).reproduced


def test_rise_end_and_kl_fall_on_known_series():
    s = [float(i) for i in range(20)]
    w = C.WINDOW
    assert C.rise(s) == pytest.approx((sum(s[-w:]) - sum(s[:w])) / w)
    assert C.rise([1.0, 3.0]) == 2.0  # short series: one point each end
    assert C.end(s) == pytest.approx(sum(s[-w:]) / w)
    assert C.kl_fall({"opd/reverse_kl": [(i, 1.0) for i in range(10)]}) == 0.0
    assert C.kl_fall({"opd/reverse_kl": [(i, 1.0 if i < 5 else 0.25) for i in range(10)]}) == pytest.approx(0.75)


def test_spearman_equals_the_textbook_formula_and_handles_ties():
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(3, 7)
        x, y = rng.sample(range(100), n), rng.sample(range(100), n)
        rank = {v: i for i, v in enumerate(sorted(x))}, {v: i for i, v in enumerate(sorted(y))}
        d2 = sum((rank[0][a] - rank[1][b]) ** 2 for a, b in zip(x, y))
        assert C.spearman(x, y) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)))
    assert C.spearman([1, 2, 3], [5, 5, 5]) == 0.0
    # ties get average ranks: brute force over the Pearson correlation of average ranks
    x, y = [1, 1, 2, 3], [1, 2, 3, 3]
    rx, ry = [0.5, 0.5, 2, 3], [0, 1, 2.5, 2.5]
    mx, my = sum(rx) / 4, sum(ry) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    ref = cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    assert C.spearman(x, y) == pytest.approx(ref)
    assert all(C.spearman(p, list(range(4))) <= 1 + 1e-12 for p in itertools.permutations(range(4)))
