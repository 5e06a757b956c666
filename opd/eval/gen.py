"""`opd eval gen`: sample N answers per benchmark problem, one resumable JSONL per (model, benchmark, settings).

Output: ``<out>/<benchmark>__<model>__<settings>.jsonl``, one line per sample: ``{example_id, sample_idx, prompt,
question, answer, seed, response, response_tokens, finish_reason}`` (prompt = the rendered chat text the model saw,
question = the user turn), plus ``<same>.meta.json`` with the settings and ``complete: true`` once all samples are in. A
complete output is skipped unless ``--replace``; an interrupted one is resumed: lines are appended per batch, and on
restart the (example_id, sample_idx) pairs already present are skipped and a truncated last line is cut off.

Backends (``opd.sampling``): vLLM when installed and a GPU is visible (one request per sample, each with its own
seed, so every sample is reproducible alone), else transformers with ``opd.generation.sample`` (KV-cached batches;
``seed`` is then the seed of the batch's generator: an uninterrupted rerun with the same settings reproduces the
file). The vLLM path cannot be exercised on our CPU test machines.

Example::

    opd eval gen --model ckpt/actor --benchmark aime24 amc23 --data-dir data/bench --n 16 --out eval_out
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from opd.errors import UsageError, command
from opd.eval.benchmarks import Benchmark, load_benchmark
from opd.io import atomic_write_text
from opd.models import model_source, normalize_dtype, vllm_dtype
from opd.presets import EVAL
from opd.sampling import TransformersSampler, VLLMSampler

__all__ = ["GenSettings", "output_paths", "read_done", "generate_benchmark", "main"]


@dataclass(frozen=True)
class GenSettings:
    n: int = EVAL.n  # the evaluation protocol (opd.presets), shared with training's validation defaults
    temperature: float = EVAL.temperature
    top_p: float = EVAL.top_p
    max_tokens: int = EVAL.max_tokens
    thinking: str | None = None  # "on" / "off" / None (template default)
    template: str = "boxed"
    seed: int = 0

    def tag(self) -> str:
        think = self.thinking or "default"
        tmpl = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(self.template).stem)
        return f"n{self.n}_t{self.temperature:g}_p{self.top_p:g}_len{self.max_tokens}_think-{think}_{tmpl}_s{self.seed}"

    def template_kwargs(self) -> dict:
        return {} if self.thinking is None else {"enable_thinking": self.thinking == "on"}


# Folder names that say nothing about which model it is (checkpoint layouts of opd, verl, HF Trainer, LlamaFactory).
_GENERIC_DIR = re.compile(
    r"^(?:(?:global_)?step_?\d+|checkpoint-\d+|checkpoints?|ckpts?|actor|huggingface|hf|final|"
    r"latest|last|best|saves?|models?|outputs?|runs?|merged|export(?:ed)?)$",
    re.IGNORECASE,
)


def model_tag(model_path: str) -> str:
    """A readable, file-name-safe model name. A generic checkpoint folder is prefixed with the nearest telling
    ancestor and any step folders in between (runs/a/checkpoints/step_000200 -> a-step_000200,
    exp/global_step_40/actor/huggingface -> exp-global_step_40-huggingface), so two runs' checkpoints of the same
    step do not share an output file."""
    parts = [p for p in Path(str(model_path).rstrip("/")).parts if p not in ("/", ".", "..")] or ["model"]
    i = len(parts) - 1
    while i >= 0 and _GENERIC_DIR.match(parts[i]):
        i -= 1
    kept = [p for p in parts[i + 1 : -1] if re.search(r"\d", p)] + [parts[-1]]
    if i >= 0 and i < len(parts) - 1:
        kept.insert(0, parts[i])
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(kept))


def _model_path_key(model_path: str) -> str:
    return os.path.abspath(model_path) if os.path.exists(model_path) else str(model_path)


def output_paths(out_dir: Path, bench: str, model: str, settings: GenSettings) -> tuple[Path, Path]:
    stem = f"{bench}__{model}__{settings.tag()}"
    return out_dir / f"{stem}.jsonl", out_dir / f"{stem}.meta.json"


def sample_seed(base: int, example_id: int, sample_idx: int) -> int:
    """A per-sample seed that does not depend on batching or on resumption."""
    digest = hashlib.blake2b(f"{base}:{example_id}:{sample_idx}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def read_done(path: Path) -> set[tuple[int, int]]:
    """(example_id, sample_idx) pairs already in ``path``; a truncated or corrupt tail is cut off in place."""
    done: set[tuple[int, int]] = set()
    if not path.exists():
        return done
    good_end = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # the last write was interrupted mid-line
            try:
                rec = json.loads(raw)
                key = (int(rec["example_id"]), int(rec["sample_idx"]))
            except (ValueError, KeyError, TypeError):
                break
            done.add(key)
            good_end += len(raw)
    if good_end < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


def _write_meta(path: Path, meta: dict) -> None:
    atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=True))


def _vllm_usable() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def make_backend(name: str, model_path: str, args: argparse.Namespace):
    """auto: vLLM when it is installed and a GPU is visible, else transformers; an explicit vllm must be usable."""
    if name == "auto":
        name = "vllm" if _vllm_usable() else "transformers"
    elif name == "vllm" and not _vllm_usable():
        raise ValueError(
            "--backend vllm needs the vllm package (pip install -e '.[vllm]') and a visible CUDA GPU; "
            "use --backend transformers (or auto) on this machine"
        )
    if name == "vllm":
        return VLLMSampler(
            model_path,
            dtype=vllm_dtype(args.dtype),
            tensor_parallel_size=args.tensor_parallel_size,
            max_model_len=args.max_model_len,
        )
    return TransformersSampler.load(model_path, device=args.device, dtype=args.dtype)


def _read_meta(meta: Path) -> dict | None:
    try:
        return json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else None
    except ValueError:
        return None


def check_same_model(jsonl: Path, meta: Path, model_path: str) -> None:
    """Refuse an output file that holds another model's samples under the same tag (never skip or delete it)."""
    m = _read_meta(meta)
    if m is not None and m.get("model_path") != _model_path_key(model_path):
        raise UsageError(
            f"{jsonl} holds samples of {m.get('model_path')!r}, not {_model_path_key(model_path)!r} "
            "(same model tag): use another --out folder"
        )


def is_complete(jsonl: Path, meta: Path, expected: int) -> bool:
    """True when ``jsonl`` holds all ``expected`` samples."""
    m = _read_meta(meta)
    if m is None or not jsonl.exists():
        return False
    return bool(m.get("complete")) and m.get("n_samples_total") == expected and len(read_done(jsonl)) == expected


def generate_benchmark(
    backend,
    bench: Benchmark,
    model_path: str,
    settings: GenSettings,
    out_dir: Path,
    batch_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate (or finish) one output file; returns its path."""
    model = model_tag(model_path)
    jsonl, meta_path = output_paths(out_dir, bench.name, model, settings)
    expected = len(bench.examples) * settings.n
    meta = {
        "benchmark": bench.name,
        "benchmark_path": os.path.abspath(bench.path),
        "model": model,
        "model_path": _model_path_key(model_path),
        "backend": type(backend).__name__,
        "seed_scope": backend.seed_scope,
        "n_examples": len(bench.examples),
        "n_samples_total": expected,
        "complete": False,
        **{f"settings_{k}": v for k, v in asdict(settings).items()},
    }
    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        for key in ("model_path", "benchmark_path", "n_examples"):
            if old.get(key) != meta[key]:
                raise ValueError(
                    f"{jsonl} was started with {key}={old.get(key)!r}, now {meta[key]!r}: use another --out folder "
                    "or --replace"
                )
    _write_meta(meta_path, meta)
    done = read_done(jsonl)
    by_id = {ex.example_id: ex for ex in bench.examples}
    tk = settings.template_kwargs()
    from opd.generation import render_prompt_ids

    prompts = {eid: render_prompt_ids(backend.tokenizer, ex.messages, **tk) for eid, ex in by_id.items()}
    prompt_text = {eid: backend.tokenizer.decode(ids) for eid, ids in prompts.items()}
    pending = [(eid, j) for eid in by_id for j in range(settings.n) if (eid, j) not in done]
    step = batch_size or backend.default_batch
    bar = tqdm(
        total=expected,
        initial=expected - len(pending),
        desc=f"{bench.name} x {model}",
        unit="sample",
        disable=not progress,
    )
    with open(jsonl, "a", encoding="utf-8") as f:
        for start in range(0, len(pending), step):
            chunk = pending[start : start + step]
            seeds = [sample_seed(settings.seed, eid, j) for eid, j in chunk]
            outs = backend.generate(
                [prompts[eid] for eid, _ in chunk],
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seeds=seeds,
            )
            for (eid, j), out in zip(chunk, outs):
                rec = {
                    "example_id": eid,
                    "sample_idx": j,
                    "prompt": prompt_text[eid],
                    "question": by_id[eid].messages[-1]["content"],
                    "answer": by_id[eid].answer,
                    "seed": out.seed,
                    "response": out.text,
                    "response_tokens": out.n_tokens,
                    "finish_reason": out.finish_reason,
                }
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    bar.close()
    if len(read_done(jsonl)) != expected:
        raise RuntimeError(f"{jsonl}: expected {expected} samples after generation, found {len(read_done(jsonl))}")
    _write_meta(meta_path, {**meta, "complete": True})
    return jsonl


def build_parser() -> argparse.ArgumentParser:
    d = GenSettings()
    p = argparse.ArgumentParser(
        prog="opd eval gen",
        description="Sample N answers per benchmark problem (docs/workflow.md §6). Writes <out>/<benchmark>__<model>__"
        "<settings>.jsonl (+ .meta.json); finished files are skipped unless --replace, interrupted ones resume.",
    )
    p.add_argument("--model", nargs="+", required=True, help="model folder(s) (HF format, with tokenizer)")
    p.add_argument(
        "--benchmark",
        nargs="+",
        required=True,
        help="benchmark file(s) (RL-schema or problem/answer parquet/jsonl) or names found in --data-dir",
    )
    p.add_argument("--data-dir", help="local folder holding <name>.parquet/.jsonl for benchmark names (no downloads)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=d.n, help="samples per problem (default %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="default %(default)s")
    p.add_argument("--top-p", type=float, default=d.top_p, help="default %(default)s")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="max response tokens (default %(default)s)")
    p.add_argument(
        "--thinking",
        choices=["on", "off"],
        help="pass enable_thinking=True/False to the chat template (Qwen3-style); unset: the template's default",
    )
    p.add_argument(
        "--template",
        default=d.template,
        help="instruction template for problem/answer files: boxed (default), "
        "dapo, none, or a text file with one {problem}",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="base seed; each sample's seed is recorded")
    p.add_argument(
        "--backend",
        choices=["auto", "vllm", "transformers"],
        default="auto",
        help="auto: vLLM if installed and a GPU is visible, else transformers",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="samples per generation call and per append (default: 64 transformers, 2048 vLLM)",
    )
    p.add_argument("--device", default="auto", help="transformers backend: cpu, cuda, cuda:1 (default auto)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on GPU, fp32 on CPU; vLLM: the model's), fp32, bf16, "
        "fp16 (float32, bfloat16, float16 are accepted too)",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    p.add_argument("--max-model-len", type=int, help="vLLM only")
    p.add_argument("--limit", type=int, help="use only the first N problems of each benchmark (smoke tests)")
    p.add_argument("--replace", action="store_true", help="regenerate outputs that already exist")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


@command("opd eval gen")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, value, ok in (
        ("--n", args.n, args.n >= 1),
        ("--max-tokens", args.max_tokens, args.max_tokens >= 1),
        ("--temperature", args.temperature, args.temperature >= 0),
        ("--top-p", args.top_p, 0 < args.top_p <= 1),
        ("--limit", args.limit, args.limit is None or args.limit >= 1),
    ):
        if not ok:
            raise UsageError(f"invalid {name} {value}")
    try:
        args.dtype = normalize_dtype(args.dtype)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    tags: dict[str, str] = {}
    for model_path in args.model:
        other = tags.setdefault(model_tag(model_path), model_path)
        if other != model_path:
            raise UsageError(
                f"--model {other} and {model_path} would share the output name {model_tag(model_path)!r}: evaluate "
                "them into different --out folders"
            )
    # every input is checked before the output folder is made: a bad one leaves nothing behind
    models = [model_source(m, "--model") for m in args.model]  # a checkpoint folder is read from its model/
    settings = GenSettings(
        args.n, args.temperature, args.top_p, args.max_tokens, args.thinking, args.template, args.seed
    )
    benches = []
    for spec in args.benchmark:
        b = load_benchmark(spec, args.data_dir, template=args.template)
        if args.limit:
            b = Benchmark(b.name, b.path, b.examples[: args.limit])
        benches.append(b)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model_path in models:
        todo = []
        for b in benches:
            jsonl, meta = output_paths(out, b.name, model_tag(model_path), settings)
            check_same_model(jsonl, meta, model_path)
            if args.replace:
                jsonl.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
            if is_complete(jsonl, meta, len(b.examples) * settings.n):
                print(f"skip (complete): {jsonl}")
            else:
                todo.append(b)
        if not todo:
            continue
        backend = make_backend(args.backend, model_path, args)
        for b in todo:
            path = generate_benchmark(
                backend, b, model_path, settings, out, args.batch_size, progress=not args.no_progress
            )
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
