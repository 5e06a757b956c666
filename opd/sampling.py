"""One sampling interface over two engines, used by `opd eval gen`, `opd rollout` and the verifier.

`TransformersSampler` runs `opd.generation.sample` on a model loaded by `opd.models.load_policy` (any machine);
`VLLMSampler` runs vLLM's offline `LLM.generate` (CUDA only; vLLM is imported when one is built, so the rest of
the package works without it). Both take rendered prompt token ids and return one `Completion` per prompt.

Seeds: with `seeds` (one per prompt), vLLM seeds every request alone, so each sample is reproducible by itself; the
transformers sampler seeds one generator for the whole call with `seeds[0]` (seed_scope "batch"). Without `seeds`,
the transformers sampler draws from the generator it was built with (`seed`), one stream across calls, and vLLM
from its engine seed. The training loop, `opd check` and the toy evaluator call `opd.generation.sample` directly:
their random streams are part of their reproducibility.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Completion", "Sampler", "TransformersSampler", "VLLMSampler"]


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # transformers: "stop" (ended on an EOS) or "length"; vLLM: its own finish_reason
    seed: int | None  # the seed this sample was drawn with (None: a stream seeded earlier)


class Sampler(Protocol):
    tokenizer: object
    seed_scope: str  # what one entry of `seeds` seeds: "batch" (the whole call) or "sample" (its own prompt)
    default_batch: int  # prompts per generate call that keep the engine busy

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seeds: list[int] | None = None,
    ) -> list[Completion]: ...


class TransformersSampler:
    """opd.generation.sample on a Hugging Face model (CPU or one GPU)."""

    seed_scope = "batch"
    default_batch = 64

    def __init__(
        self,
        policy,
        *,
        seed: int | None = None,
        batch_size: int | None = None,
        skip_special_tokens: bool = True,
        progress: bool = False,
    ):
        """`batch_size`: sequences per forward (None: the whole call); `skip_special_tokens`: of the decoded text."""
        import torch

        self.torch = torch
        self.policy = policy
        self.model, self.tokenizer = policy.model, policy.tokenizer
        self.eos_ids, self.pad_id, self.device = policy.eos_ids, policy.pad_id, policy.device
        self.generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        self.batch_size = batch_size
        self.skip_special_tokens = skip_special_tokens
        self.progress = progress

    @classmethod
    def load(cls, model_path: str, *, device: str = "auto", dtype: str = "auto", **kwargs) -> "TransformersSampler":
        from opd.models import load_policy

        return cls(load_policy(model_path, dtype=dtype, device=device, trainable=False), **kwargs)

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seeds: list[int] | None = None,
    ) -> list[Completion]:
        from opd.generation import sample

        gen = self.generator if seeds is None else self.torch.Generator(device=self.device).manual_seed(seeds[0])
        outs = sample(
            self.model,
            prompt_ids,
            max_new_tokens=max_tokens,
            eos_token_ids=self.eos_ids,
            pad_token_id=self.pad_id,
            temperature=temperature,
            top_p=top_p,
            generator=gen,
            batch_size=self.batch_size or len(prompt_ids),
            progress=self.progress,
        )
        seed = None if seeds is None else seeds[0]
        return [
            Completion(
                self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens),
                len(ids),
                "stop" if ids and ids[-1] in self.eos_ids else "length",
                seed,
            )
            for ids in outs
        ]


class VLLMSampler:
    """vLLM offline engine (not testable on CPU machines)."""

    seed_scope = "sample"
    default_batch = 2048

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        seed: int | None = None,
    ):
        """`dtype` in vLLM's spelling (opd.models.vllm_dtype); `seed`: the engine's, for requests without one."""
        from vllm import LLM

        kwargs = dict(model=model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if seed is not None:
            kwargs["seed"] = seed
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seeds: list[int] | None = None,
    ) -> list[Completion]:
        from vllm import SamplingParams

        if seeds is None:
            params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
            seeds = [None] * len(prompt_ids)
        else:
            params = [
                SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=sd)
                for sd in seeds
            ]
        outs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=params, use_tqdm=False
        )
        return [
            Completion(o.outputs[0].text, len(o.outputs[0].token_ids), str(o.outputs[0].finish_reason), sd)
            for o, sd in zip(outs, seeds)
        ]
