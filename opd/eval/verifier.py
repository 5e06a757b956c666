"""Optional verifier LLM for answers the rule grader rejected (``opd eval grade --model-verifier PATH``).

Rules miss correct answers written in an unusual form ("x = 3 or x = -3" vs "\\pm 3", words instead of LaTeX).
A verifier model reads the problem, the reference answer and the end of the response, and answers one word:
CORRECT, INCORRECT or INVALID (no final answer). It only ever sees rule failures, so it can turn a 0 into a 1
but never the reverse; its verdicts are reported beside, not instead of, the rule metrics. The prompt is ours.
Decoding is greedy; an output without a verdict word counts as INVALID.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["VERDICTS", "build_prompt", "parse_verdict", "ModelVerifier"]

VERDICTS = ("CORRECT", "INCORRECT", "INVALID")
_VERDICT_RE = re.compile(r"\b(NOT\s+CORRECT|INCORRECT|CORRECT|INVALID)\b")
_THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)
MAX_RESPONSE_CHARS = 4000  # the final answer sits at the end; keep the verifier's prompt short

PROMPT = (
    "You check answers to math problems. Compare the FINAL answer given at the end of the response with the "
    "reference answer. Judge mathematical equivalence only: ignore formatting, units written out, and the "
    "quality of the reasoning.\n\n"
    "Problem:\n{question}\n\n"
    "Reference answer:\n{reference}\n\n"
    "End of the response:\n{response}\n\n"
    "Reply with one word: CORRECT if the final answer is equivalent to the reference, INCORRECT if it is not, "
    "INVALID if the response gives no final answer."
)


def build_prompt(question: str, reference: str, response: str) -> str:
    tail = response[-MAX_RESPONSE_CHARS:]
    return PROMPT.format(question=question.strip(), reference=reference.strip(), response=tail.strip())


def parse_verdict(text: str) -> str:
    """The first verdict word in the verifier's output after any ``<think>`` block (case-insensitive; "not
    correct" reads as INCORRECT); INVALID when there is none."""
    m = _VERDICT_RE.search(_THINK_RE.sub(" ", text).upper())
    if m is None:
        return "INVALID"
    return "INCORRECT" if m.group(1).startswith("NOT") else m.group(1)


class ModelVerifier:
    """A Hugging Face causal LM used as a judge (transformers, greedy, batched)."""

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 32,
        batch_size: int = 16,
        template_kwargs: dict | None = None,
    ):
        from opd.sampling import TransformersSampler

        # keep special tokens: a thinking model's <think> block may be one, and parse_verdict must see it to skip it
        self.sampler = TransformersSampler.load(
            model_path, device=device, dtype=dtype, batch_size=batch_size, skip_special_tokens=False, progress=True
        )
        self.max_new_tokens = max_new_tokens
        self.template_kwargs = template_kwargs or {}

    def judge(self, items: Sequence[tuple[str, str, str]]) -> list[str]:
        """Verdicts for (question, reference, response) triples."""
        from opd.generation import render_prompt_ids

        tok = self.sampler.tokenizer
        prompts = [
            render_prompt_ids(tok, [{"role": "user", "content": build_prompt(*it)}], **self.template_kwargs)
            for it in items
        ]
        outs = self.sampler.generate(prompts, max_tokens=self.max_new_tokens, temperature=0.0)
        return [parse_verdict(out.text) for out in outs]
