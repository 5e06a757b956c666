"""Rollouts for the local engine: sample n responses per prompt, grade them, and lay them out as one padded batch.

Sampling is `opd.generation.sample` (KV-cached, batched, one explicit torch.Generator so a resumed run replays the
same samples). The layout is the one every later pass reads: prompts left-padded to a common width P, responses
right-padded to a common width T, so the logits predicting response token t of every row sit in column P - 1 + t
and a forward with `logits_to_keep = T + 1` yields exactly the response-aligned logits [N, T, V].

GRPO note: with this sampler the rollout log-probs equal the trainer's own (same weights, same kernels), so the
truncated importance weights between a separate rollout engine (vLLM) and the trainer are identically 1 here.
"""

from __future__ import annotations

from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields

import torch

from opd.generation import sample
from opd.grading import grade_batch

GRADE_WORKERS = 2  # math-verify worker processes of the rule reward (started once per run: `start_workers`)


@dataclass
class RolloutBatch:
    input_ids_NL: torch.Tensor  # long [N, P + T]: left-padded prompt | right-padded response
    attention_mask_NL: torch.Tensor  # long [N, P + T]
    response_ids_NT: torch.Tensor  # long [N, T]; 0 at padding (a real id, so gathers never fail)
    response_mask_NT: torch.Tensor  # float32 [N, T]: 1 at response tokens (EOS included)
    group_index_N: torch.Tensor  # long [N]: which prompt of the step a row answers
    prompt_width: int  # P

    @property
    def n_rows(self) -> int:
        return self.input_ids_NL.shape[0]

    @property
    def resp_width(self) -> int:
        return self.response_ids_NT.shape[1]

    def rows(self, start: int, stop: int) -> "RolloutBatch":
        """Rows [start, stop) with the padding columns that no kept row needs trimmed away."""
        attn = self.attention_mask_NL[start:stop]
        prompt_lens = attn[:, : self.prompt_width].sum(-1)
        resp_lens = self.response_mask_NT[start:stop].sum(-1).long()
        p_keep = int(prompt_lens.max())
        t_keep = max(1, int(resp_lens.max()))
        cols = slice(self.prompt_width - p_keep, self.prompt_width + t_keep)
        return RolloutBatch(
            input_ids_NL=self.input_ids_NL[start:stop, cols],
            attention_mask_NL=attn[:, cols],
            response_ids_NT=self.response_ids_NT[start:stop, :t_keep],
            response_mask_NT=self.response_mask_NT[start:stop, :t_keep],
            group_index_N=self.group_index_N[start:stop],
            prompt_width=p_keep,
        )

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(
            **{
                f.name: (v.to(device) if torch.is_tensor(v) else v)
                for f in fields(self)
                for v in [getattr(self, f.name)]
            }
        )


def collate(prompts: list[list[int]], responses: list[list[int]], group_index: list[int], pad_id: int) -> RolloutBatch:
    """Left-pad prompts, right-pad responses (an empty response keeps one masked column).

    Rows are laid out in flat Python lists, one conversion per tensor: per-row tensor writes cost ~20 us a row."""
    n = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(1, max(len(r) for r in responses))
    ids, attn, resp, mask = [], [], [], []
    for p, r in zip(prompts, responses):
        lp, lr = len(p), len(r)
        ids += [pad_id] * (P - lp)
        ids += p
        ids += r
        ids += [pad_id] * (T - lr)
        attn += [0] * (P - lp) + [1] * (lp + lr) + [0] * (T - lr)
        resp += r
        resp += [0] * (T - lr)
        mask += [1.0] * lr + [0.0] * (T - lr)
    return RolloutBatch(
        torch.frombuffer(array("q", ids), dtype=torch.long).view(n, P + T),
        torch.frombuffer(array("q", attn), dtype=torch.long).view(n, P + T),
        torch.frombuffer(array("q", resp), dtype=torch.long).view(n, T),
        torch.frombuffer(array("f", mask), dtype=torch.float32).view(n, T),
        torch.as_tensor(group_index, dtype=torch.long),
        P,
    )


def micro_batch_bounds(batch: RolloutBatch, token_budget: int) -> list[tuple[int, int]]:
    """Contiguous row ranges whose padded size (rows x (prompt + response width)) stays within `token_budget`.

    A single row longer than the budget still forms its own micro-batch (the budget bounds memory, not correctness).
    """
    prompt_lens = batch.attention_mask_NL[:, : batch.prompt_width].sum(-1).tolist()
    resp_lens = batch.response_mask_NT.sum(-1).long().tolist()
    bounds, start, p_max, t_max = [], 0, 0, 0
    for i, (p, t) in enumerate(zip(prompt_lens, resp_lens)):
        np_max, nt_max = max(p_max, p), max(t_max, t, 1)
        if i > start and (i - start + 1) * (np_max + nt_max) > token_budget:
            bounds.append((start, i))
            start, np_max, nt_max = i, p, max(t, 1)
        p_max, t_max = np_max, nt_max
    bounds.append((start, len(prompt_lens)))
    return bounds


class Rollouts:
    """A step's rollouts: the padded batch, the decoded texts and, from the rule reward, `scores` (1.0 correct) and
    `extracted` (the final answer found, None: none). `generate` grades in a background thread (the grader's
    symbolic checks run in worker processes), so the step's model passes overlap with it; reading `scores` or
    `extracted` waits for the grades (and raises what grading raised)."""

    def __init__(self, batch: RolloutBatch, texts: list[str], truncated: list[bool], grades):
        self.batch = batch
        self.texts = texts  # decoded responses (special tokens skipped)
        self.truncated = truncated  # hit the length limit without EOS
        self._grades = grades  # a Future of, or a list of, GradeResult
        self._scores: list[float] | None = None
        self._extracted: list[str | None] | None = None

    def _resolve(self) -> None:
        if self._extracted is None:
            graded = self._grades.result() if isinstance(self._grades, Future) else self._grades
            self._extracted = [g.extracted for g in graded]
            if self._scores is None:
                self._scores = [g.score for g in graded]

    @property
    def scores(self) -> list[float]:
        self._resolve()
        return self._scores

    @scores.setter
    def scores(self, value: list[float]) -> None:  # a test's or an experiment's own reward
        self._resolve()
        self._scores = list(value)

    @property
    def extracted(self) -> list[str | None]:
        self._resolve()
        return self._extracted


_GRADER: ThreadPoolExecutor | None = None  # one background thread grades each step's rollouts


def _grade_in_background(texts: list[str], ground_truths: list[str]) -> Future:
    global _GRADER
    if _GRADER is None:
        _GRADER = ThreadPoolExecutor(1, thread_name_prefix="opd-grade")
    return _GRADER.submit(grade_batch, texts, ground_truths, workers=GRADE_WORKERS)


def generate(
    model,
    tokenizer,
    prompts: list[tuple[int, ...]],
    ground_truths: list[str],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    generator: torch.Generator,
    batch_size: int,
    eos_ids: list[int],
    pad_id: int,
    progress: bool = False,
    observe=None,
    compile: bool = False,
) -> Rollouts:
    """n samples per prompt (rows grouped by prompt: prompt i owns rows i*n .. i*n+n-1), graded by the rule reward
    in the background (`Rollouts`).

    `observe` and `compile` go to the sampler (`opd.generation.sample`): `observe` sees each position's logits and
    sampled token, `compile` decodes with a compiled step (TrainConfig.compile_sampler)."""
    repeated = [list(p) for p in prompts for _ in range(n)]
    responses = sample(
        model,
        repeated,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        generator=generator,
        batch_size=batch_size,
        progress=progress,
        observe=observe,
        compile=compile,
    )
    group = [i for i in range(len(prompts)) for _ in range(n)]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    grades = _grade_in_background(texts, [ground_truths[g] for g in group])
    eos = set(eos_ids)
    truncated = [not (r and r[-1] in eos) for r in responses]
    return Rollouts(collate(repeated, responses, group, pad_id), texts, truncated, grades)
