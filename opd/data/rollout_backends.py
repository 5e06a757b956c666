"""Generation backends for `opd rollout`: transformers (any machine) and vLLM (CUDA, one process per GPU).

Both turn the shared worker loop `opd.data.rollout.run_worker` into real sampling by supplying its `generate_fn`.
Sampling is `opd.sampling` (models load with local_files_only, so a missing model fails fast instead of downloading).
The vLLM path cannot run on the project's CPU test machines; it is kept small and uses only vLLM's public
`LLM.generate` API.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
from pathlib import Path

from opd.data.rollout import RolloutSettings, run_worker


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_backend(backend: str) -> str:
    if backend == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None and _cuda_available() else "transformers"
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("--backend vllm: vllm is not installed (pip install 'opd[vllm]' on a CUDA machine)")
    return backend


def sampler_generate_fn(sampler, settings: RolloutSettings):
    """A generate_fn: chat-render the prompts with the sampler's tokenizer, sample one response text each."""
    from opd.generation import render_prompt_ids

    def generate(prompts: list[list[dict]], seeds: list[int] | None = None) -> list[str]:
        ids = [render_prompt_ids(sampler.tokenizer, m, **settings.template_kwargs) for m in prompts]
        outs = sampler.generate(
            ids, max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p, seeds=seeds
        )
        return [out.text for out in outs]

    return generate


def transformers_generate_fn(
    settings: RolloutSettings, dtype: str = "auto", batch_size: int = 64, device: str = "auto"
):
    """A generate_fn sampling with opd.generation.sample on `device` (auto: GPU 0, else CPU); one random stream,
    seeded once with the rollout seed."""
    from opd.sampling import TransformersSampler

    sampler = TransformersSampler.load(
        settings.model, device=device, dtype=dtype, seed=settings.seed, batch_size=batch_size
    )
    return sampler_generate_fn(sampler, settings)


def worker_gpus(requested: list[str] | None, visible: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each vLLM worker. `--gpus` ids count within the parent's
    CUDA_VISIBLE_DEVICES when that is set (as for any CUDA program); with no --gpus, one worker per visible GPU."""
    parent = [g.strip() for g in visible.split(",") if g.strip()] if visible is not None else None
    if not requested:
        if parent is not None:
            return parent
        import torch

        return [str(i) for i in range(max(1, torch.cuda.device_count()))]
    if parent is None:
        return list(requested)
    out = []
    for g in requested:
        if not g.isdigit() or int(g) >= len(parent):
            raise ValueError(f"--gpus {g}: CUDA_VISIBLE_DEVICES={visible} makes GPUs 0..{len(parent) - 1} visible")
        out.append(parent[int(g)])
    return out


def _vllm_worker(
    worker: int, gpu: str, prompts, settings: RolloutSettings, part: str, batch_prompts: int, dtype: str = "auto"
) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before vllm/torch touch CUDA in this fresh (spawned) process
    from opd.models import vllm_dtype
    from opd.sampling import VLLMSampler

    sampler = VLLMSampler(settings.model, seed=settings.seed + worker, dtype=vllm_dtype(dtype))
    generate = sampler_generate_fn(sampler, settings)
    run_worker(prompts, generate, settings, Path(part), batch_prompts=batch_prompts, progress=worker == 0)


def run_backend(
    prompts,
    settings: RolloutSettings,
    pdir: Path,
    *,
    backend: str,
    gpus: list[str] | None,
    batch_prompts: int,
    progress: bool,
    dtype: str,
    device: str = "auto",
    done: frozenset[int] | set[int] = frozenset(),
) -> None:
    """Sample the `prompts` (index, messages) not in `done` (`opd.data.rollout.run_worker` says how a resumed batch
    keeps its samples)."""
    backend = choose_backend(backend)
    if backend == "transformers":
        gen = transformers_generate_fn(
            settings, dtype=dtype, batch_size=max(1, batch_prompts) * settings.n, device=device
        )
        run_worker(
            prompts, gen, settings, pdir / "worker-0.jsonl", batch_prompts=batch_prompts, progress=progress, done=done
        )
        return
    todo = [(i, m) for i, m in prompts if i not in done]  # vLLM seeds each sample alone: any split reproduces
    gpus = worker_gpus(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    ctx = mp.get_context("spawn")
    procs = []
    for w, gpu in enumerate(gpus):
        share = todo[w :: len(gpus)]
        if share:
            p = ctx.Process(
                target=_vllm_worker,
                args=(w, gpu, share, settings, str(pdir / f"worker-{w}.jsonl"), max(batch_prompts, 256), dtype),
            )
            p.start()
            procs.append(p)
    failed = []
    for p in procs:
        p.join()
        failed += [p.exitcode] if p.exitcode else []
    if failed:
        raise RuntimeError(f"{len(failed)} vLLM worker(s) failed (exit codes {failed}); rerun to resume")
