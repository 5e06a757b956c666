"""`opd report RUN_DIR`: the OPD dynamics report (markdown + PNG plots), drawn after training from the run's logs.

Why afterwards: plotting inside the training loop couples the loop to matplotlib and hides failures; the run folder's
`metrics.jsonl` (one JSON line per step, written by the engine) and `profiles.jsonl` (per-position arrays at some
steps) hold everything, so the report can be redrawn any time, for any run, including an unfinished one.

Output (default `RUN_DIR/report/`): `report.md`; `headline.png` (held-out accuracy, training reward, overlap ratio,
top-1 agreement, overlap mass, entropy gap, reverse KL vs step); `scalars_<group>.png` (every scalar vs step, one
figure per key group, position windows `pos/...` in their own figures); `profiles.png` (per-position statistics at
the first and last profiled step) when profiles were logged; and `report_summary.json` (first/last/min/max of every
scalar) for machines.

    opd report runs/my_run            # writes runs/my_run/report/report.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

from opd.errors import command
from opd.io import atomic_path, atomic_write_text

# headline panels: (title, [metric keys or regexes]); each panel draws every key that exists in the run
HEADLINE: list[tuple[str, list[str]]] = [
    ("held-out accuracy", [r"val/mean@\d+"]),
    ("training reward (rule, rollouts)", ["train/true_reward"]),
    ("top-k overlap ratio |S∩T|/K", ["opd/overlap_ratio"]),
    ("top-1 agreement", ["opd/top1_agreement"]),
    ("overlap mass", ["opd/overlap_mass_student", "opd/overlap_mass_teacher"]),
    ("entropy gap (teacher - student)", ["opd/entropy/gap"]),
    ("per-token reverse KL", ["opd/reverse_kl"]),
]
_POS = re.compile(r"^(?P<prefix>.*?)pos/(?P<window>[^/]+)/(?P<name>.+)$")  # e.g. opd/pos/0-255/overlap_ratio


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a malformed line raises naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows


def scalar_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, values)} over every numeric key; null (non-finite) values are skipped, rows sorted by step."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in sorted(rows, key=lambda r: r["step"]):
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(int(row["step"]))
            values.append(float(value))
    return series


def summarize(series: dict[str, tuple[list[int], list[float]]]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "first_step": steps[0],
            "first": vals[0],
            "last_step": steps[-1],
            "last": vals[-1],
            "min": min(vals),
            "max": max(vals),
        }
        for key, (steps, vals) in sorted(series.items())
    }


def _match(keys, patterns: list[str]) -> list[str]:
    out = []
    for pat in patterns:
        out += [k for k in sorted(keys) if re.fullmatch(pat, k) and k not in out]
    return out


def group_of(key: str) -> str:
    """Figure group of a key: `pos` for position windows, else its first path component (opd, actor, val...)."""
    return "pos" if _POS.match(key) else key.split("/")[0]


def group_panels(group: str, keys: list[str], series) -> list[tuple[str, dict]]:
    """One panel per key; position windows instead get one panel per statistic with a line per window."""
    if group != "pos":
        return [(k, {k: series[k]}) for k in sorted(keys)]
    panels: dict[str, dict] = {}
    for k in sorted(keys):
        m = _POS.match(k)
        panels.setdefault(m["prefix"] + m["name"], {})[f"positions {m['window']}"] = series[k]
    return sorted(panels.items())


def _atomic_savefig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, n)
    return math.ceil(n / cols), cols


def plot_panels(
    panels: list[tuple[str, dict[str, tuple[list, list]]]], path: Path, suptitle: str, xlabel: str = "step"
) -> None:
    """One subplot per (title, {label: (x, y)}) panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, lines) in zip(axes.flat, panels):
        for label, (x, y) in lines.items():
            ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=6)
    fig.suptitle(suptitle, fontsize=11)
    # fixed margins in inches: tight_layout measured every tick label and took about 40% of the report's time
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=0.55 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.75 / height, wspace=0.3, hspace=0.55
    )
    _atomic_savefig(fig, path)
    plt.close(fig)


def headline_panels(series) -> list[tuple[str, dict]]:
    panels = []
    for title, patterns in HEADLINE:
        keys = _match(series, patterns)
        if keys:
            panels.append((title, {k: series[k] for k in keys}))
    return panels


def profile_panels(profiles: list[dict]) -> list[tuple[str, dict]]:
    """Every per-position statistic (each list-valued key) at the first and last profiled step."""
    if not profiles:
        return []
    chosen = [profiles[0]] if len(profiles) == 1 else [profiles[0], profiles[-1]]
    keys = sorted({k for prof in chosen for k, v in prof.items() if isinstance(v, list) and k != "position"})
    panels = []
    for key in keys:
        lines = {}
        for prof in chosen:
            if isinstance(prof.get(key), list) and "position" in prof:
                pts = [(x, y) for x, y in zip(prof["position"], prof[key]) if y is not None and math.isfinite(y)]
                if pts:
                    lines[f"step {prof['step']}"] = ([p[0] for p in pts], [p[1] for p in pts])
        if lines:
            panels.append((key, lines))
    return panels


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _flat_row(row: dict) -> dict:
    """verl's file logger (ENGINE=verl) nests a step's metrics under "data"; the local engine writes them flat."""
    if set(row) == {"step", "data"} and isinstance(row["data"], dict):
        return {"step": row["step"], **row["data"]}
    return row


def write_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    title: str | None = None,
    extra_markdown: str = "",
) -> Path:
    """Draw every plot and write report.md; returns the path of report.md."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: not found (is {run_dir} a run folder written by `opd train`?)")
    rows = [_flat_row(row) for row in read_jsonl(metrics_path)]
    if not rows:
        raise ValueError(f"{metrics_path}: no rows")
    for i, row in enumerate(rows, 1):
        if "step" not in row:
            raise ValueError(f"{metrics_path}:{i}: row has no 'step' key")
    series = scalar_series(rows)
    profiles_path = run_dir / "profiles.jsonl"
    profiles = read_jsonl(profiles_path) if profiles_path.is_file() else []
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    lines = [
        f"# {title or 'OPD report: ' + run_dir.name}",
        "",
        f"Run folder: `{run_dir}`; {len(rows)} logged steps "
        f"(step {min(r['step'] for r in rows)} to {max(r['step'] for r in rows)}).",
        "",
    ]
    if extra_markdown:
        lines += [extra_markdown.rstrip(), ""]
    panels = headline_panels(series)
    if panels:
        plot_panels(panels, out / "headline.png", "OPD dynamics")
        lines += [
            "## Headline dynamics",
            "",
            "![headline](headline.png)",
            "",
            "| metric | first (step) | last (step) | min | max |",
            "|---|---|---|---|---|",
        ]
        for _, keys in panels:
            for key in keys:
                s = summarize({key: series[key]})[key]
                lines.append(
                    f"| `{key}` | {_fmt(s['first'])} ({s['first_step']}) | {_fmt(s['last'])} "
                    f"({s['last_step']}) | {_fmt(s['min'])} | {_fmt(s['max'])} |"
                )
        lines.append("")
    prof_panels = profile_panels(profiles)
    if prof_panels:
        plot_panels(prof_panels, out / "profiles.png", "per-position statistics", xlabel="response position")
        lines += ["## Along the response", "", "![profiles](profiles.png)", ""]
    groups: dict[str, list[str]] = {}
    for key in series:
        groups.setdefault(group_of(key), []).append(key)
    lines += ["## Every scalar vs step", ""]
    for group, keys in sorted(groups.items()):
        name = f"scalars_{re.sub(r'[^A-Za-z0-9_]', '_', group)}.png"
        plot_panels(group_panels(group, keys, series), out / name, f"{group}/*")
        lines += [f"### {group} ({len(keys)} keys)", "", f"![{group}]({name})", ""]
    summary = summarize(series)
    atomic_write_text(out / "report_summary.json", json.dumps(summary, indent=1))
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report


@command("opd report")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="opd report",
        description="Draw the OPD dynamics report (report.md + PNG plots + report_summary.json) from a run folder's "
        "metrics.jsonl (and profiles.jsonl when present).",
    )
    p.add_argument("run_dir", help="run folder written by `opd train` (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    p.add_argument("--title", default=None, help="report title")
    args = p.parse_args(argv)
    path = write_report(args.run_dir, args.out, args.title)
    print(f"opd report: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
