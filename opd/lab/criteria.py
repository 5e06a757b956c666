"""The lab's claims: each phenomenon of the paper with its pass criterion, written down before the judged seeds run.

Every criterion is a pure function of the measurements (accuracy curves, dynamics series, pre-flight metrics) of
all seeds, so it is tested on synthetic curves and cannot be bent by a run. Thresholds were set on the calibration
seeds (`opd.lab.config.CALIBRATION_SEEDS`) and are frozen here; a phenomenon that misses them is reported as not
reproduced, with its numbers.

Shared definitions: accuracy is greedy and rule-graded on held-out problems; a run's *gain* is its last accuracy
minus its first (validation before step 1); a series' *rise* is the mean of its last `WINDOW` points minus the mean
of its first `WINDOW`; means and spreads (population standard deviation) are over seeds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

WINDOW = 5  # steps averaged at each end of a dynamics series
ACC = "val/lab_what_is/mean@1"  # the template every teacher was trained on
ACC_OTHER = "val/lab_sum_of/mean@1"

# thresholds (fractions of 1; "points" in the report are these x 100)
TEACHERS_WITHIN = 0.03  # (a) the two teachers' accuracies may differ by at most this
COMPAT_MARGIN = 0.10  # (a) compatible gain - incompatible gain, mean over seeds
RATIO_RISE = 0.02  # (b) the compatible run's overlap-ratio rise
MASS_RISE = 0.01  # (b) the compatible run's overlap-mass rise
FLAT_SHARE = 0.5  # (b) the failing run rises by at most this share of the successful run's rise
RESCUE_WITHIN = 0.05  # (c) cold start + OPD ends within this of the compatible pair's final accuracy ...
RESCUE_ABOVE = 0.05  # (c) ... and this far above the incompatible pair's
MASS_FLOOR = 0.90  # (d) shared top-k mass (student and teacher) at the end of the successful run
RANK_RHO = 0.6  # (e) Spearman rank correlation, initial overlap ratio vs gain, mean over seeds
PEER_SCORES_WITHIN = 0.03  # (f) the peer scores at least the student's accuracy minus this
PEER_GAIN_SHARE = 1 / 3  # (f) the peer's gain is at most this share of the compatible gain ...
PEER_GAIN_FLOOR = 0.03  # (f) ... or at most this, whichever is larger
ALIGN_MARGIN = 0.05  # (g) aligned gain - misaligned gain (both templates), mean over seeds


def values(curves: dict, key: str) -> list[float]:
    return [v for _, v in curves.get(key, [])]


def gain(curves: dict, key: str = ACC) -> float:
    acc = values(curves, key)
    return acc[-1] - acc[0]


def final(curves: dict, key: str = ACC) -> float:
    return values(curves, key)[-1]


def both_templates_gain(curves: dict) -> float:
    return (gain(curves, ACC) + gain(curves, ACC_OTHER)) / 2


def rise(series: list[float], window: int = WINDOW) -> float:
    w = max(1, min(window, len(series) // 2))
    return statistics.fmean(series[-w:]) - statistics.fmean(series[:w])


def end(series: list[float], window: int = WINDOW) -> float:
    return statistics.fmean(series[-max(1, min(window, len(series))) :])


def overlap_mass(curves: dict) -> list[float]:
    """The shared top-k set's mass, the mean of the student's and the teacher's share."""
    s, t = values(curves, "opd/overlap_mass_student"), values(curves, "opd/overlap_mass_teacher")
    return [(a + b) / 2 for a, b in zip(s, t)]


def kl_fall(curves: dict) -> float:
    """The relative fall of the per-token reverse KL over the run (1 = to zero, 0 = flat, < 0 = rose)."""
    kl = values(curves, "opd/reverse_kl")
    first = statistics.fmean(kl[: max(1, min(WINDOW, len(kl) // 2))])
    return (first - end(kl)) / first if first > 0 else 0.0


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties; 0 when either side is constant)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return 0.0
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def mean_spread(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0


@dataclass(frozen=True)
class Verdict:
    reproduced: bool
    numbers: dict[str, tuple[float, float]]  # name -> (mean, spread) over seeds


@dataclass(frozen=True)
class Phenomenon:
    key: str
    title: str
    criterion: str
    pairs: tuple[str, ...]  # the OPD pairs it needs
    judge: Callable[[list[dict]], Verdict]


def _per_seed(seeds: list[dict], fn) -> tuple[float, float]:
    return mean_spread([fn(m) for m in seeds])


def judge_compatibility(seeds: list[dict]) -> Verdict:
    gap = [abs(m["teachers"]["columns"] - m["teachers"]["partial"]) for m in seeds]
    diffs = [gain(m["runs"]["compatible"]) - gain(m["runs"]["incompatible"]) for m in seeds]
    numbers = {
        "teacher accuracy, columns": _per_seed(seeds, lambda m: m["teachers"]["columns"]),
        "teacher accuracy, partial sums": _per_seed(seeds, lambda m: m["teachers"]["partial"]),
        "gain, compatible": _per_seed(seeds, lambda m: gain(m["runs"]["compatible"])),
        "gain, incompatible": _per_seed(seeds, lambda m: gain(m["runs"]["incompatible"])),
        "gain difference": mean_spread(diffs),
    }
    ok = max(gap) <= TEACHERS_WITHIN and statistics.fmean(diffs) >= COMPAT_MARGIN and min(diffs) > 0
    return Verdict(ok, numbers)


def judge_dynamics(seeds: list[dict]) -> Verdict:
    ratio = {
        p: [rise(values(m["runs"][p], "opd/overlap_ratio")) for m in seeds] for p in ("compatible", "incompatible")
    }
    mass = {p: [rise(overlap_mass(m["runs"][p])) for m in seeds] for p in ("compatible", "incompatible")}
    fall = {p: [kl_fall(m["runs"][p]) for m in seeds] for p in ("compatible", "incompatible")}
    mean = {k: {p: statistics.fmean(v) for p, v in d.items()} for k, d in (("r", ratio), ("m", mass), ("f", fall))}
    ok = (
        mean["r"]["compatible"] >= RATIO_RISE
        and mean["r"]["incompatible"] <= FLAT_SHARE * mean["r"]["compatible"]
        and mean["m"]["compatible"] >= MASS_RISE
        and mean["m"]["incompatible"] <= FLAT_SHARE * mean["m"]["compatible"]
        and mean["f"]["compatible"] > mean["f"]["incompatible"]
    )
    numbers = {}
    for label, d in (("overlap ratio rise", ratio), ("overlap mass rise", mass), ("reverse KL relative fall", fall)):
        for p in ("compatible", "incompatible"):
            numbers[f"{label}, {p}"] = mean_spread(d[p])
    return Verdict(ok, numbers)


def judge_cold_start(seeds: list[dict]) -> Verdict:
    fin = {p: [final(m["runs"][p]) for m in seeds] for p in ("compatible", "incompatible", "cold_start")}
    mean = {p: statistics.fmean(v) for p, v in fin.items()}
    ok = (
        mean["cold_start"] >= mean["compatible"] - RESCUE_WITHIN
        and mean["cold_start"] >= mean["incompatible"] + RESCUE_ABOVE
    )
    numbers = {f"final accuracy, {p}": mean_spread(v) for p, v in fin.items()}
    numbers["accuracy before the cold start (student)"] = _per_seed(
        seeds, lambda m: values(m["runs"]["compatible"], ACC)[0]
    )
    numbers["accuracy after the cold start, before OPD"] = _per_seed(
        seeds, lambda m: values(m["runs"]["cold_start"], ACC)[0]
    )
    return Verdict(ok, numbers)


def judge_concentration(seeds: list[dict]) -> Verdict:
    s = [end(values(m["runs"]["compatible"], "opd/overlap_mass_student")) for m in seeds]
    t = [end(values(m["runs"]["compatible"], "opd/overlap_mass_teacher")) for m in seeds]
    ok = statistics.fmean(s) >= MASS_FLOOR and statistics.fmean(t) >= MASS_FLOOR
    return Verdict(
        ok, {"shared top-k mass, student (end)": mean_spread(s), "shared top-k mass, teacher (end)": mean_spread(t)}
    )


# The pairs whose teacher knows more than the student. The peer is left out on purpose: the paper's own finding (f)
# is that a teacher with nothing new looks most like the student and teaches nothing, so it would rank first on
# overlap and last on gain by design, not by a failure of the check.
PREFLIGHT_PAIRS = ("compatible", "incompatible", "cold_start", "misaligned")


def own_gain(m: dict, pair: str) -> float:
    """The gain on the template the pair trained on (and `opd check` sampled): the check predicts these prompts."""
    return gain(m["runs"][pair], ACC_OTHER if pair == "misaligned" else ACC)


def judge_preflight(seeds: list[dict]) -> Verdict:
    rhos = [
        spearman([m["checks"][p]["overlap_ratio"] for p in PREFLIGHT_PAIRS], [own_gain(m, p) for p in PREFLIGHT_PAIRS])
        for m in seeds
    ]
    numbers = {"Spearman rho, initial overlap vs gain": mean_spread(rhos)}
    for p in PREFLIGHT_PAIRS:
        numbers[f"initial overlap ratio, {p}"] = _per_seed(seeds, lambda m, p=p: m["checks"][p]["overlap_ratio"])
    return Verdict(statistics.fmean(rhos) >= RANK_RHO, numbers)


def judge_no_new_knowledge(seeds: list[dict]) -> Verdict:
    peer_acc = [m["models"]["peer"] for m in seeds]
    student_acc = [m["models"]["student"] for m in seeds]
    g_peer = [gain(m["runs"]["peer"]) for m in seeds]
    g_comp = [gain(m["runs"]["compatible"]) for m in seeds]
    ok = statistics.fmean(peer_acc) >= statistics.fmean(student_acc) - PEER_SCORES_WITHIN and statistics.fmean(
        g_peer
    ) <= max(PEER_GAIN_FLOOR, PEER_GAIN_SHARE * statistics.fmean(g_comp))
    numbers = {
        "accuracy, peer teacher": mean_spread(peer_acc),
        "accuracy, student": mean_spread(student_acc),
        "gain, peer": mean_spread(g_peer),
        "gain, compatible": mean_spread(g_comp),
    }
    return Verdict(ok, numbers)


def judge_aligned_prompts(seeds: list[dict]) -> Verdict:
    g = {p: [both_templates_gain(m["runs"][p]) for m in seeds] for p in ("compatible", "misaligned")}
    r = {p: [rise(values(m["runs"][p], "opd/overlap_ratio")) for m in seeds] for p in ("compatible", "misaligned")}
    ok = statistics.fmean(g["compatible"]) - statistics.fmean(g["misaligned"]) >= ALIGN_MARGIN and statistics.fmean(
        r["compatible"]
    ) > statistics.fmean(r["misaligned"])
    numbers = {
        "gain (both templates), aligned prompts": mean_spread(g["compatible"]),
        "gain (both templates), misaligned prompts": mean_spread(g["misaligned"]),
        "overlap ratio rise, aligned": mean_spread(r["compatible"]),
        "overlap ratio rise, misaligned": mean_spread(r["misaligned"]),
    }
    return Verdict(ok, numbers)


def _pts(x: float) -> str:
    return f"{100 * x:g} points"


PHENOMENA = (
    Phenomenon(
        "a",
        "pattern compatibility",
        f"teachers within {_pts(TEACHERS_WITHIN)} of each other; OPD from the compatible teacher gains at least "
        f"{_pts(COMPAT_MARGIN)} more than from the incompatible one (mean), and more on every seed",
        ("compatible", "incompatible"),
        judge_compatibility,
    ),
    Phenomenon(
        "b",
        "dynamics",
        f"successful run: overlap ratio rises >= {RATIO_RISE}, overlap mass >= {MASS_RISE}; failing run: each rises "
        f"at most {FLAT_SHARE:g}x as much; reverse KL falls faster (relative) in the successful run",
        ("compatible", "incompatible"),
        judge_dynamics,
    ),
    Phenomenon(
        "c",
        "off-policy cold start",
        f"cold start on the incompatible teacher's samples, then OPD from it: final accuracy within "
        f"{_pts(RESCUE_WITHIN)} of the compatible pair's and at least {_pts(RESCUE_ABOVE)} above the incompatible "
        f"pair's",
        ("compatible", "incompatible", "cold_start"),
        judge_cold_start,
    ),
    Phenomenon(
        "d",
        "concentration",
        f"at the end of the successful run the shared top-k set holds >= {MASS_FLOOR:.0%} of both models' mass",
        ("compatible",),
        judge_concentration,
    ),
    Phenomenon(
        "e",
        "pre-flight prediction",
        f"`opd check`'s initial overlap ratio ranks the {len(PREFLIGHT_PAIRS)} pairs whose teacher knows more "
        f"({', '.join(PREFLIGHT_PAIRS)}) like their gains on their own prompts: Spearman rho >= {RANK_RHO} (mean "
        f"over seeds)",
        PREFLIGHT_PAIRS,
        judge_preflight,
    ),
    Phenomenon(
        "f",
        "no new knowledge",
        f"a peer (the student's size, data and budget, another init) scoring at least the student's accuracy minus "
        f"{_pts(PEER_SCORES_WITHIN)} gains at most max({_pts(PEER_GAIN_FLOOR)}, {PEER_GAIN_SHARE:.2g} x the "
        f"compatible gain)",
        ("compatible", "peer"),
        judge_no_new_knowledge,
    ),
    Phenomenon(
        "g",
        "teacher-aligned prompts",
        f"prompts in the teacher's template gain at least {_pts(ALIGN_MARGIN)} more (accuracy over both templates) "
        f"than prompts in the other template, and the overlap ratio rises more",
        ("compatible", "misaligned"),
        judge_aligned_prompts,
    ),
)

QUICK = ("a", "b", "c")
