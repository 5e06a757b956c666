"""The lab report: one row per phenomenon (criterion, measured mean ± spread, verdict), the curves each claim rests
on (every seed thin, the mean thick), and the `opd check` table of the pairs. Written from the measurements alone."""

from __future__ import annotations

import statistics
from pathlib import Path

from opd.lab.criteria import ACC, ACC_OTHER, Phenomenon, Verdict, overlap_mass, own_gain

COLOURS = {
    "compatible": "tab:green",
    "incompatible": "tab:red",
    "cold_start": "tab:blue",
    "peer": "tab:grey",
    "misaligned": "tab:orange",
}
CHECK_COLUMNS = (
    ("overlap_ratio", "overlap ratio"),
    ("top1_agreement", "top-1 agreement"),
    ("reverse_kl", "reverse KL"),
    ("entropy/gap", "entropy gap"),
)


def _fmt(name: str, mean: float, spread: float) -> str:
    if "accuracy" in name or name.startswith("gain"):  # fractions of problems, shown in points
        return f"{name}: {100 * mean:.1f} ± {100 * spread:.1f} pts"
    return f"{name}: {mean:.3f} ± {spread:.3f}"


def verdict_table(judged: list[tuple[Phenomenon, Verdict]], n_seeds: int) -> str:
    lines = [
        f"| | phenomenon | criterion (fixed before the judged seeds ran) | measured, mean ± spread over {n_seeds} "
        f"seed(s) | verdict |",
        "|---|---|---|---|---|",
    ]
    for ph, v in judged:
        measured = "<br>".join(_fmt(k, *mv) for k, mv in v.numbers.items())
        verdict = "**reproduced**" if v.reproduced else "**not reproduced**"
        lines.append(f"| ({ph.key}) | {ph.title} | {ph.criterion} | {measured} | {verdict} |")
    return "\n".join(lines)


def check_table(seeds: list[dict]) -> str:
    pairs = [p for p in COLOURS if all(p in m["checks"] for m in seeds)]
    head = "| pair | " + " | ".join(label for _, label in CHECK_COLUMNS) + " | student accuracy (sample) | gain |"
    lines = [head, "|" + "---|" * (len(CHECK_COLUMNS) + 3)]
    for p in pairs:
        cells = [f"{statistics.fmean(m['checks'][p][key] for m in seeds):.3f}" for key, _ in CHECK_COLUMNS]
        acc = statistics.fmean(m["check_accuracy"][p] for m in seeds)
        g = statistics.fmean(own_gain(m, p) for m in seeds)
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {100 * acc:.1f}% | {100 * g:+.1f} pts |")
    return "\n".join(lines)


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    n = min(len(c) for c in curves)
    return [s for s, _ in curves[0][:n]], [statistics.fmean(c[i][1] for c in curves) for i in range(n)]


def _panel(ax, seeds: list[dict], series, title: str, pairs) -> None:
    for p in pairs:
        if not all(p in m["runs"] for m in seeds):
            continue
        curves = [series(m["runs"][p]) for m in seeds]
        for c in curves:
            ax.plot([s for s, _ in c], [v for _, v in c], color=COLOURS[p], alpha=0.25, linewidth=0.8)
        xs, ys = _mean_curve(curves)
        ax.plot(xs, ys, color=COLOURS[p], linewidth=2, label=p)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)


def _steps(curves: dict, key: str) -> list[tuple[int, float]]:
    return [tuple(x) for x in curves.get(key, [])]


def _with_steps(curves: dict, ys: list[float], key: str) -> list[tuple[int, float]]:
    return [(s, y) for (s, _), y in zip(curves[key], ys)]


def plot(seeds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from opd.io import atomic_path

    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    every = tuple(COLOURS)
    _panel(axes[0, 0], seeds, lambda c: _steps(c, ACC), "(a, c, f) accuracy, teacher's template", every)
    _panel(axes[0, 1], seeds, lambda c: _steps(c, "opd/overlap_ratio"), "(b) top-k overlap ratio", every)
    _panel(
        axes[0, 2],
        seeds,
        lambda c: _with_steps(c, overlap_mass(c), "opd/overlap_mass_student"),
        "(b, d) shared top-k mass",
        every,
    )
    _panel(axes[1, 0], seeds, lambda c: _steps(c, "opd/reverse_kl"), "(b) per-token reverse KL", every)

    def both(c):
        a, b = _steps(c, ACC), _steps(c, ACC_OTHER)
        return [(s, (x + y) / 2) for (s, x), (_, y) in zip(a, b)]

    _panel(axes[1, 1], seeds, both, "(g) accuracy, both templates", ("compatible", "misaligned"))
    ax = axes[1, 2]
    for p, colour in COLOURS.items():
        pts = [(m["checks"][p]["overlap_ratio"], own_gain(m, p)) for m in seeds if p in m["checks"]]
        if pts:
            ax.scatter([x for x, _ in pts], [100 * y for _, y in pts], color=colour, label=p)
    ax.set_title("(e) opd check's initial overlap vs OPD gain (own template)", fontsize=9)
    ax.set_xlabel("initial overlap ratio", fontsize=8)
    ax.set_ylabel("gain (points)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def write_report(out: Path, title: str, judged, seeds: list[dict], setup_md: str) -> Path:
    from opd.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    plot(seeds, out / "lab.png")
    n_ok = sum(v.reproduced for _, v in judged)
    text = "\n\n".join(
        [
            f"# {title}",
            f"{n_ok} of {len(judged)} phenomena reproduced.",
            verdict_table(judged, len(seeds)),
            "![curves](lab.png)\n\nThin lines: one seed each; thick: the mean over seeds.",
            "## Pre-flight check of each pair (`opd check`, mean over seeds)",
            check_table(seeds),
            "## Set-up",
            setup_md,
        ]
    )
    atomic_write_text(out / "report.md", text + "\n")
    return out / "report.md"
