"""A model's final hidden states and output embedding, so the full-vocabulary loss never builds [T, V] logits.

`opd.core.step.step_loss` takes both models' `OutputHead`s in place of their logits (LOG_PROB_TOP_K = -1). That
holds only when a model's logits really are `lm_head(last hidden state)`: a model with a final soft-cap, a logit
scale or a custom head does something else. `head_of` checks it once per model on a 4-token input, comparing the
model's own logits with the rebuilt ones, and returns None (the caller falls back to logits) when they differ.
"""

from __future__ import annotations

import sys
import weakref

import torch

from opd.core.step import OutputHead
from opd.engines.local.rollout import RolloutBatch

_CHECKED: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def _parts(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model:
        return None
    return base, head


@torch.no_grad()
def _rebuilds_logits(model) -> bool:
    base, head = _parts(model)
    device = head.weight.device
    ids = torch.arange(1, 5, device=device)[None] % head.weight.shape[0]
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = head(base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state)
    finally:
        model.train(was_training)
    scale = float(want.abs().max().clamp(min=1.0))
    return want.shape == got.shape and bool((want.float() - got.float()).abs().max() <= 1e-3 * scale)


def has_output_head(model) -> bool:
    """True when the model's logits are its output embedding applied to its final hidden states (checked once)."""
    if model not in _CHECKED:
        _CHECKED[model] = _parts(model) is not None and _rebuilds_logits(model)
    return _CHECKED[model]


def response_hidden(model, mb: RolloutBatch) -> torch.Tensor:
    """Final hidden states at the positions predicting each response token, [n, T, H] (one forward, no logits)."""
    base, _ = _parts(model)
    position_ids = (mb.attention_mask_NL.cumsum(-1) - 1).clamp_min(0)
    out = base(
        input_ids=mb.input_ids_NL, attention_mask=mb.attention_mask_NL, position_ids=position_ids, use_cache=False
    )
    T = mb.resp_width
    return out.last_hidden_state[:, -(T + 1) : -1]


def output_head(model, hidden_NTH: torch.Tensor, vocab_size: int | None = None) -> OutputHead:
    """The model's head over its first `vocab_size` rows (the shared vocabulary) at the given hidden states."""
    _, head = _parts(model)
    rows = slice(None) if vocab_size is None else slice(0, vocab_size)
    bias = None if head.bias is None else head.bias[rows]
    return OutputHead(hidden_NTH, head.weight[rows], bias)


def head_logits(head: OutputHead) -> torch.Tensor:
    """The logits an `OutputHead` stands for, [n, T, V] (for the reads, which need them anyway)."""
    return torch.nn.functional.linear(head.hidden_NTH, head.weight_VH, head.bias_V)


_SAID: set[int] = set()


def use_output_heads(cfg, student, teacher) -> bool:
    """Whether the full-vocabulary loss runs from both models' output heads (saying once when it cannot)."""
    if cfg.support != "full" or teacher is None:
        return False
    ok = has_output_head(student) and has_output_head(teacher)
    if not ok and id(student) not in _SAID:
        _SAID.add(id(student))
        print(
            "opd train: note: the student or the teacher does not expose its logits as output embedding x final "
            "hidden state; the full-vocabulary loss uses their logits (the teacher runs again in the update)",
            file=sys.stderr,
        )
    return ok
