"""Generation backends for `opd rollout`: transformers (any machine) and vLLM (CUDA, one process per GPU).

Both turn the shared worker loop `opd.data.rollout.run_worker` into real sampling by supplying its `generate_fn`.
Models load with local_files_only, so a missing model fails fast instead of downloading.
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


def transformers_generate_fn(settings: RolloutSettings, dtype: str = "auto", batch_size: int = 64):
    """A generate_fn sampling with opd.generation.sample on GPU 0 (or CPU) from the chat-rendered prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.generation import render_prompt_ids, sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = (torch.bfloat16 if device == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(settings.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch_dtype, local_files_only=True).to(device)
    eos = getattr(model.generation_config, "eos_token_id", None) or tok.eos_token_id
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos]), *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
    if not eos_ids:
        raise ValueError(f"{settings.model}: neither the tokenizer nor generation_config names an EOS token")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    gen = torch.Generator(device=device).manual_seed(settings.seed)

    def generate(prompts: list[list[dict]]) -> list[str]:
        ids = [render_prompt_ids(tok, m, **settings.template_kwargs) for m in prompts]
        out = sample(model, ids, max_new_tokens=settings.max_tokens, temperature=settings.temperature,
                     top_p=settings.top_p, eos_token_ids=eos_ids, pad_token_id=pad, generator=gen,
                     batch_size=batch_size)
        return tok.batch_decode(out, skip_special_tokens=True)

    return generate


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


def _vllm_worker(worker: int, gpu: str, prompts, settings: RolloutSettings, part: str, batch_prompts: int,
                 dtype: str = "auto") -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before vllm/torch touch CUDA in this fresh (spawned) process
    from vllm import LLM, SamplingParams

    llm = LLM(model=settings.model, seed=settings.seed + worker, dtype=dtype)
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_tokens)

    def generate(batch: list[list[dict]]) -> list[str]:
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False, **settings.template_kwargs)
                 for m in batch]
        outs = llm.generate([{"prompt_token_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts],
                            params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    run_worker(prompts, generate, settings, Path(part), batch_prompts=batch_prompts, progress=worker == 0)


def run_backend(todo, settings: RolloutSettings, pdir: Path, *, backend: str, gpus: list[str] | None,
                batch_prompts: int, progress: bool, dtype: str) -> None:
    backend = choose_backend(backend)
    if backend == "transformers":
        gen = transformers_generate_fn(settings, dtype=dtype, batch_size=max(1, batch_prompts) * settings.n)
        run_worker(todo, gen, settings, pdir / "worker-0.jsonl", batch_prompts=batch_prompts, progress=progress)
        return
    gpus = worker_gpus(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    ctx = mp.get_context("spawn")
    procs = []
    for w, gpu in enumerate(gpus):
        share = todo[w :: len(gpus)]
        if share:
            p = ctx.Process(target=_vllm_worker, args=(w, gpu, share, settings, str(pdir / f"worker-{w}.jsonl"),
                                                          max(batch_prompts, 256), dtype))
            p.start()
            procs.append(p)
    failed = []
    for p in procs:
        p.join()
        failed += [p.exitcode] if p.exitcode else []
    if failed:
        raise RuntimeError(f"{len(failed)} vLLM worker(s) failed (exit codes {failed}); rerun to resume")
