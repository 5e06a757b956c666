"""Tensor bundles passed between the core's stages. Suffixes name dimensions: N rollouts, T response positions,
K top-k width, C support slots (K, 2K, +1 with a tail bucket), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogitStats:
    """What one no-grad pass over a model's logits yields (float32, log-probs at temperature)."""

    topk_ids_NTK: torch.Tensor | None  # long; the model's own top-k ids (None when k == 0)
    topk_lp_NTK: torch.Tensor | None  # log-probs at those ids
    lp_at_ids_NTJ: torch.Tensor | None  # log-probs at caller-given ids (e.g. sampled token, the other model's top-k)
    entropy_NT: torch.Tensor  # full-vocabulary entropy


@dataclass
class Support:
    """The candidate set C_t of a top-k strategy, as fixed-width slots.

    Invalid slots (de-duplicated, outside an intersection, ...) keep a valid token id (so gathers never fail) but
    `valid_NTC` is False there and every reward/advantage/loss term at them is exactly 0.
    A tail-bucket slot (the last slot when present) has id -1; its log-probs are log(1 - mass of the other slots).
    """

    ids_NTC: torch.Tensor  # long
    valid_NTC: torch.Tensor  # bool
    student_lp_NTC: torch.Tensor  # float32, log p_t(v_c) (full-vocabulary normalised)
    teacher_lp_NTC: torch.Tensor  # float32, log q_t(v_c)
    in_student_topk_NTC: torch.Tensor  # bool: v_c in S_t
    in_teacher_topk_NTC: torch.Tensor  # bool: v_c in T_t
    has_tail: bool = False


@dataclass(frozen=True)
class OutputHead:
    """A model's last layer, so a kernel can rebuild any chunk of its logits: logits = hidden @ weight.T (+ bias).
    Passed where logits would be, it lets the reads and losses run without a [T, V] tensor."""

    hidden_NTH: torch.Tensor  # final hidden states at the scored positions (after the final norm)
    weight_VH: torch.Tensor  # the output embedding (lm_head.weight), possibly tied to the input embedding
    bias_V: torch.Tensor | None = None
