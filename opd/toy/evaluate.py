"""Held-out accuracy of a model on toy problems: sample with the KV-cached sampler, grade with the rule grader.

Greedy decoding by default: deterministic, cheap, and the number the demo reports before and after OPD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opd.generation import render_prompt_ids, sample
from opd.grading import score_response
from opd.models import special_ids
from opd.toy.task import N_DIGITS, Problem

# N_DIGITS column lines of at most 10 tokens ("9+9+1=19\n" is 9) plus "\boxed{1998}" and EOS, with a margin.
MAX_NEW_TOKENS = 12 * N_DIGITS + 16


def sample_responses(
    model,
    tokenizer,
    problems: Sequence,
    *,
    temperature: float,
    seed: int,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 250,
    progress: bool = False,
    observe=None,
) -> list[list[int]]:
    """One response (token ids) per problem from its chat prompt, with the KV-cached sampler seeded by `seed`."""
    prompts = [render_prompt_ids(tokenizer, p.messages()) for p in problems]
    eos_ids, pad_id = special_ids(tokenizer, model)
    return sample(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        generator=torch.Generator().manual_seed(seed),
        batch_size=batch_size,
        progress=progress,
        observe=observe,
    )


def accuracy(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 250,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, float]:
    """{"accuracy": fraction graded correct, "response_length": mean tokens} over `problems`."""
    responses = sample_responses(
        model,
        tokenizer,
        problems,
        temperature=temperature,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = [score_response(t, p.answer) for t, p in zip(texts, problems)]
    return {"accuracy": sum(scores) / len(scores), "response_length": sum(map(len, responses)) / len(responses)}
