"""Validation during training: n samples per held-out problem, graded by the rule reward, per data source.

Metrics (all under the "val/" prefix, which training-batch diagnostics never use): `val/<source>/mean@n` (average
accuracy of the n samples = avg@n), `val/<source>/best@n` (some sample correct = pass@n), `val/<source>/maj@n`
(the most frequent final answer is correct: `opd.eval.metrics.majority_score`, the maj_score of `opd eval grade`, so
"1/2" and "0.5" are one answer; ties go to the answer seen first), `val/<source>/response_length`,
and `val/mean@n` over every problem of every file. Sampling uses its own generator seeded from (seed, step), so
validating or not never changes the training samples (a resumed run stays identical).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from opd.engines.local.data import PromptSet
from opd.engines.local.rollout import generate
from opd.eval.metrics import majority_score


def summarise(n: int, per_problem: list[tuple[str, list[float], list[str | None], list[int]]]) -> dict[str, float]:
    """[(data_source, scores[n], extracted[n], lengths[n])] -> val/ metrics."""
    by_source: dict[str, list] = defaultdict(list)
    for item in per_problem:
        by_source[item[0]].append(item)
    out: dict[str, float] = {}
    for source, items in sorted(by_source.items()):
        out[f"val/{source}/mean@{n}"] = sum(sum(s) / len(s) for _, s, _, _ in items) / len(items)
        out[f"val/{source}/best@{n}"] = sum(max(s) for _, s, _, _ in items) / len(items)
        out[f"val/{source}/maj@{n}"] = sum(majority_score(e, s) for _, s, e, _ in items) / len(items)
        out[f"val/{source}/response_length"] = sum(sum(ln) / len(ln) for *_, ln in items) / len(items)
    out[f"val/mean@{n}"] = sum(sum(s) / len(s) for _, s, _, _ in per_problem) / len(per_problem)
    return out


@torch.no_grad()
def validate(
    model,
    tokenizer,
    val_sets: list[PromptSet],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    repetition_penalty: float,
    seed: int,
    step: int,
    batch_size: int,
    eos_ids: list[int],
    pad_id: int,
    progress: bool = False,
) -> dict[str, float]:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step + 1)
    per_problem = []
    for val_set in val_sets:
        problems = val_set.problems
        rollouts = generate(
            model,
            tokenizer,
            [p.prompt_ids for p in problems],
            [p.ground_truth for p in problems],
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            generator=generator,
            batch_size=batch_size,
            eos_ids=eos_ids,
            pad_id=pad_id,
            progress=progress,
        )
        lengths = rollouts.batch.response_mask_NT.sum(-1).long().tolist()
        for i, problem in enumerate(problems):
            rows = slice(i * n, (i + 1) * n)
            per_problem.append((problem.data_source, rollouts.scores[rows], rollouts.extracted[rows], lengths[rows]))
    return summarise(n, per_problem)
