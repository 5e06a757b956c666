"""`opd rollout`: teacher rollouts over a prompt parquet, with rejection sampling, as SFT cold-start data.

Workflow.md §3. Each prompt gets --n slots; with --enable-rejection-sampling a slot whose response breaks a rule of
`opd.data.rejection` is re-sampled, up to --max-attempts-per-rollout attempts, after which the slot is abandoned.
Backends: vLLM when it is installed and a GPU is visible (one worker process per GPU in --gpus or
CUDA_VISIBLE_DEVICES, each taking every k-th prompt), else transformers with `opd.generation.sample` (one process,
GPU 0 or CPU, or --device). The vLLM path needs a CUDA machine and is not exercised by the test suite.

Resumable: every worker appends one JSON line per finished prompt to `<output>.parts/worker-<k>.jsonl` (flushed
and fsynced), so a restart with the same settings skips finished prompts; nothing is duplicated or lost. A torn
last line (a kill mid-append, even inside a multi-byte character) is cut off with one line saying so. The
backends seed every generation round from the rollout seed and its slots (prompt, slot, attempt), and a batch with
unfinished prompts is sampled again whole, its finished prompts not written twice, so a resumed rollout writes
exactly what the uninterrupted one would have.
At the end all parts are merged into --output, one `{"messages": [user..., assistant]}` line per accepted
response, sorted by prompt index (row order of the parquet), plus `<output stem>.summary.json` with the completion
rate and rejections by reason. Both are written atomically. The model is read from a local folder or an
already-populated Hugging Face cache; nothing is downloaded.

  opd rollout --input prompts.parquet --model Qwen/Qwen3-4B --output sft/qwen3_4b_answers.jsonl \\
      --disable-thinking --temperature 0.7 --top-p 0.95 --max-tokens 8192 --n 1 --enable-rejection-sampling
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from opd.data.rejection import REASONS, rejection_reason
from opd.data.schema import DataError, read_rl_parquet
from opd.errors import command, usage_errors
from opd.io import atomic_path, atomic_write_text, repair_torn_tail
from opd.models import model_source, normalize_dtype

# chat prompts (one list of messages each) -> one sampled response text per prompt, same order. A function that also
# takes `seeds` (one per prompt, from `slot_seed`) is called with them: the real backends do (reproducible resume).
GenerateFn = Callable[[list[list[dict]]], list[str]]


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """Everything that changes what a rollout samples; a resumed run must match the stored copy."""

    model: str
    n: int = 1
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 8192
    enable_thinking: bool | None = None
    rejection_sampling: bool = False
    max_attempts: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.max_attempts < 1:
            raise ValueError(f"--max-attempts-per-rollout must be >= 1, got {self.max_attempts}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")

    @property
    def attempts_per_slot(self) -> int:
        return self.max_attempts if self.rejection_sampling else 1

    @property
    def template_kwargs(self) -> dict:
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}


def parts_dir(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parts")


def summary_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".summary.json")


def _is_record(line: str) -> bool:
    try:
        int(json.loads(line)["prompt_index"])
    except (ValueError, KeyError, TypeError):
        return False
    return True


def read_parts(pdir: Path) -> dict[int, dict]:
    """Finished-prompt records of every worker file, by prompt index.

    A torn last line (a crash during the write, possibly inside a multi-byte character) is cut off, saying so, so
    the next append starts on a fresh line and that prompt simply runs again. A prompt found twice (e.g. a restart
    with another GPU count) keeps its first record. A damaged line further up is a DataError naming the file.
    """
    records: dict[int, dict] = {}
    for part in sorted(pdir.glob("worker-*.jsonl")):
        dropped = repair_torn_tail(part, is_complete=_is_record)
        if dropped:
            print(
                f"opd rollout: {part}: removed a torn last line ({dropped} bytes, an interrupted write); its prompt "
                f"runs again",
                file=sys.stderr,
            )
        for k, raw in enumerate(part.read_bytes().splitlines()):
            try:
                rec = json.loads(raw.decode("utf-8"))
                int(rec["prompt_index"])
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                raise DataError(f"corrupt record on line {k + 1}; delete the file to redo its prompts", file=part)
            records.setdefault(int(rec["prompt_index"]), rec)
    return records


def slot_seed(seed: int, prompt_index: int, slot: int, attempt: int) -> int:
    """The seed of one sampling attempt, a function of the rollout seed and the slot alone (31 bits, for vLLM)."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{slot}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _takes_seeds(generate_fn) -> bool:
    try:
        return "seeds" in inspect.signature(generate_fn).parameters
    except (TypeError, ValueError):
        return False


def _append(part: Path, record: dict) -> None:
    with open(part, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_worker(
    prompts: list[tuple[int, list[dict]]],
    generate_fn: GenerateFn,
    settings: RolloutSettings,
    part: Path,
    *,
    batch_prompts: int = 64,
    progress: bool = True,
    done: frozenset[int] | set[int] = frozenset(),
) -> None:
    """Sample every slot of `prompts` (index, messages) not in `done`, appending one record per prompt to `part` once
    it is done.

    Each round sends all still-open slots of a batch of prompts to `generate_fn` at once, so retries of rejected
    slots are batched as well. A seeded `generate_fn` (one taking `seeds`) gets the slots' seeds, and batches are cut
    from all of `prompts`: one with unfinished prompts is sampled again whole, so each round holds what it held in
    an uninterrupted run and draws the same samples; its prompts in `done` are not written again. An unseeded one
    gets only the unfinished prompts.
    """
    from tqdm.auto import tqdm

    seeded = _takes_seeds(generate_fn)
    if not seeded:
        prompts = [(i, m) for i, m in prompts if i not in done]
    part.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=sum(i not in done for i, _ in prompts), desc=f"rollout {part.stem}", unit="prompt", disable=not progress
    )
    try:
        for start in range(0, len(prompts), batch_prompts):
            batch = dict(prompts[start : start + batch_prompts])
            if all(i in done for i in batch):
                continue
            accepted: dict[int, dict[int, str]] = {i: {} for i in batch}
            rejections = {i: collections.Counter() for i in batch}
            abandoned: collections.Counter[int] = collections.Counter()
            slot_tries: collections.Counter[tuple[int, int]] = collections.Counter()
            open_slots = [(i, s) for i in batch for s in range(settings.n)]
            while open_slots:
                asked = [batch[i] for i, _ in open_slots]
                if seeded:
                    seeds = [slot_seed(settings.seed, i, s, slot_tries[i, s]) for i, s in open_slots]
                    texts = generate_fn(asked, seeds=seeds)
                else:
                    texts = generate_fn(asked)
                if len(texts) != len(open_slots):
                    raise RuntimeError(f"generate_fn returned {len(texts)} texts for {len(open_slots)} prompts")
                still_open = []
                for (i, s), text in zip(open_slots, texts):
                    slot_tries[i, s] += 1
                    reason = rejection_reason(text) if settings.rejection_sampling else None
                    if reason is None:
                        accepted[i][s] = text
                    else:
                        rejections[i][reason] += 1
                        if slot_tries[i, s] < settings.attempts_per_slot:
                            still_open.append((i, s))
                        else:
                            abandoned[i] += 1
                open_slots = still_open
                busy = {i for i, _ in open_slots}
                for i in [i for i in batch if i not in busy]:
                    if i in done:
                        del batch[i]
                        continue
                    _append(
                        part,
                        {
                            "prompt_index": i,
                            "responses": [accepted[i][s] for s in sorted(accepted[i])],
                            "abandoned": abandoned[i],
                            "attempts": sum(slot_tries[i, s] for s in range(settings.n)),
                            "rejections": dict(rejections[i]),
                        },
                    )
                    del batch[i]
                    bar.update(1)
    finally:
        bar.close()


def merge(rows: list[dict], records: dict[int, dict], settings: RolloutSettings, output: Path, input_path: str) -> dict:
    """Write the ShareGPT JSONL (sorted by prompt index) and the summary JSON, both atomically; return the summary."""
    n_lines = 0
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i in sorted(records):
            for text in records[i]["responses"]:
                messages = [*rows[i]["prompt"], {"role": "assistant", "content": text}]
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                n_lines += 1
    rejected = collections.Counter()
    for rec in records.values():
        rejected.update(rec["rejections"])
    slots = settings.n * len(rows)
    summary = {
        "input": str(input_path),
        "output": str(output),
        "prompts": len(rows),
        "finished_prompts": len(records),
        "complete": len(records) == len(rows),
        "slots": slots,
        "accepted": n_lines,
        "abandoned_slots": sum(rec["abandoned"] for rec in records.values()),
        "completion_rate": n_lines / slots if slots else 0.0,
        "attempts": sum(rec["attempts"] for rec in records.values()),
        "rejections": {r: rejected.get(r, 0) for r in REASONS},
        "settings": dataclasses.asdict(settings),
    }
    atomic_write_text(summary_path(output), json.dumps(summary, indent=2) + "\n")
    return summary


def _fingerprint(rows: list[dict]) -> str:
    """Hash of the prompts in row order: partial records are keyed by row index, so the input must not change."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def _check_run_file(pdir: Path, settings: RolloutSettings, fingerprint: str, overwrite: bool) -> None:
    run_file = pdir / "run.json"
    want = {"settings": dataclasses.asdict(settings), "prompts_sha256": fingerprint}
    if overwrite and pdir.exists():
        for f in pdir.iterdir():
            f.unlink()
    if run_file.exists():
        have = json.loads(run_file.read_text(encoding="utf-8"))
        if have != want:
            diff = {
                k: (have["settings"].get(k), v) for k, v in want["settings"].items() if have["settings"].get(k) != v
            }
            if have.get("prompts_sha256") != fingerprint:
                diff["input prompts"] = ("other file contents", "")
            raise ValueError(
                f"{pdir} holds a run with other settings (stored, now): {diff}; pass --overwrite to start over"
            )
    else:
        pdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_file, json.dumps(want, indent=2) + "\n")


def rollout(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    settings: RolloutSettings,
    generate_fn: GenerateFn | None = None,
    *,
    backend: str = "auto",
    gpus: list[str] | None = None,
    batch_prompts: int = 64,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    dtype: str = "auto",
    device: str = "auto",
) -> dict:
    """Resume-or-run the rollout and merge; `generate_fn` (tests, custom engines) replaces the backends."""
    rows = read_rl_parquet(input_path)
    output = Path(output)
    pdir = parts_dir(output)
    _check_run_file(pdir, settings, _fingerprint(rows), overwrite)
    if limit is not None:
        rows = rows[:limit]
    done = read_parts(pdir)
    prompts = [(i, row["prompt"]) for i, row in enumerate(rows)]
    if any(i not in done for i, _ in prompts):
        if generate_fn is not None:
            run_worker(
                prompts,
                generate_fn,
                settings,
                pdir / "worker-0.jsonl",
                batch_prompts=batch_prompts,
                progress=progress,
                done=set(done),
            )
        else:
            from opd.data import rollout_backends as rb

            rb.run_backend(
                prompts,
                settings,
                pdir,
                backend=backend,
                gpus=gpus,
                batch_prompts=batch_prompts,
                progress=progress,
                dtype=dtype,
                device=device,
                done=set(done),
            )
        done = read_parts(pdir)
    done = {i: rec for i, rec in done.items() if i < len(rows)}  # an earlier run may have gone past --limit
    return merge(rows, done, settings, output, str(input_path))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd rollout",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--input", required=True, help="prompt parquet in the RL schema (from `opd data prepare`)")
    p.add_argument("--model", required=True, help="teacher: local folder or a model id already in the HF cache")
    p.add_argument("--output", required=True, help="ShareGPT JSONL to write; the summary goes next to it")
    p.add_argument("--n", type=int, default=1, help="response slots per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="default 1.0 (paper: 0.7 for the cold-start set)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=8192, help="max new tokens per response (paper: ~7k-12k)")
    think = p.add_mutually_exclusive_group()
    think.add_argument(
        "--enable-thinking",
        dest="enable_thinking",
        action="store_const",
        const=True,
        help="pass enable_thinking=True to the chat template (Qwen3-style models)",
    )
    think.add_argument(
        "--disable-thinking",
        dest="enable_thinking",
        action="store_const",
        const=False,
        help="pass enable_thinking=False (default: the template's own default)",
    )
    p.add_argument(
        "--enable-rejection-sampling",
        action="store_true",
        help="re-sample responses that break a validity rule (no \\boxed, repeated lines/windows/blocks)",
    )
    p.add_argument("--max-attempts-per-rollout", type=int, default=3, help="attempts per slot before abandoning it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--backend",
        choices=["auto", "vllm", "transformers"],
        default="auto",
        help="auto: vLLM if installed and a GPU is visible, else transformers",
    )
    p.add_argument("--gpus", help="comma-separated GPU ids, one vLLM worker each (default: CUDA_VISIBLE_DEVICES)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="model dtype: auto (bf16 on GPU, fp32 on CPU; vLLM: the model's), "
        "fp32, bf16, fp16 (float32, bfloat16, float16 are accepted too)",
    )
    p.add_argument("--device", default="auto", help="transformers backend: auto (GPU 0, else CPU), cpu, cuda, cuda:1")
    p.add_argument("--batch-prompts", type=int, default=64, help="prompts per generation round (vLLM: per request)")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--overwrite", action="store_true", help="discard the partial files of an earlier run")
    p.add_argument("--no-progress", action="store_true")
    return p


@command("opd rollout")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with usage_errors():
        dtype = normalize_dtype(args.dtype)
    model = model_source(args.model, "--model")  # before the .parts folder is made; a checkpoint: its model/
    with usage_errors():
        settings = RolloutSettings(
            model=model,
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            enable_thinking=args.enable_thinking,
            rejection_sampling=args.enable_rejection_sampling,
            max_attempts=args.max_attempts_per_rollout,
            seed=args.seed,
        )
    summary = rollout(
        args.input,
        args.output,
        settings,
        backend=args.backend,
        gpus=args.gpus.split(",") if args.gpus else None,
        batch_prompts=args.batch_prompts,
        limit=args.limit,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        dtype=dtype,
        device=args.device,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
