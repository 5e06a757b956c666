"""Built-in supervised fine-tuning (SFT) for the off-policy cold start: assistant tokens only, plain PyTorch loop.

Why built in: the paper cold-starts the student with LlamaFactory, which needs its own environment (it pins an older
transformers). This path needs nothing beyond transformers, so the embedded demo and small runs work anywhere.

Masking works with any chat template: for each assistant turn we render the conversation up to that turn with the
generation prompt, then up to and including the turn; the characters between the two renderings are the assistant's
(its content and end-of-turn marker). The whole conversation is tokenised once, and tokens whose character offsets
fall inside those spans keep their labels; every other token gets label -100. A template whose prefix renderings are
not prefixes of the full rendering (some templates rewrite earlier turns) is rejected with a clear error.

Loss: token-mean cross-entropy over all assistant tokens of the optimiser batch, so micro-batching (gradient
accumulation) gives the same update as one big batch. Logits are computed only at labelled positions, a chunk at a
time with recomputation in backward, so a 150k vocabulary never needs [batch, length, vocab] float32 logits.
AdamW (no decay on 1-D parameters) with linear warmup then cosine decay to `min_lr_ratio` (`opd.optim`).
An optional `evaluate(model, step) -> dict` callback runs every `eval_every` steps; training stops early when the
metric `stop_metric` first reaches `stop_threshold` (the toy demo stops the student's cold start at a target dev
accuracy, because a fixed step count lands anywhere on its steep learning curve).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from opd.optim import clip_grad_norm, make_optimizer, make_scheduler

IGNORE = -100


@dataclass(frozen=True)
class SFTConfig:
    # defaults follow the paper's cold start (docs/workflow.md §5): lr 1e-5, 2 epochs, batch 64, warmup 0.05,
    # cutoff 14336
    lr: float = 1e-5
    steps: int = 0  # optimiser steps; 0 = derive from `epochs`
    epochs: float = 2.0
    batch_size: int = 64  # sequences per optimiser step
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = batch_size (no accumulation)
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    max_length: int = 14336  # longer conversations are dropped (counted), never silently truncated
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = never call `evaluate` during training
    stop_metric: str = "accuracy"
    stop_threshold: float | None = None  # stop when evaluate(...)[stop_metric] >= this
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "steps": self.steps >= 0,
            "epochs": self.epochs > 0,
            "batch_size": self.batch_size >= 1,
            "micro_batch_size": self.micro_batch_size >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip >= 0,
            "max_length": self.max_length >= 2,
            "log_every": self.log_every >= 1,
            "eval_every": self.eval_every >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SFTConfig.{name}={getattr(self, name)!r} is not valid")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"SFTConfig.batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}"
            )
        if self.stop_threshold is not None and not self.eval_every:
            raise ValueError("SFTConfig.stop_threshold needs eval_every > 0 (the metric is checked at evaluations)")


def _render(tokenizer, messages, add_generation_prompt: bool, template_kwargs: dict) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )


def assistant_char_spans(tokenizer, messages: Sequence[dict], **template_kwargs) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant turn in it."""
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("conversation has no assistant message: nothing to train on")
    full = _render(tokenizer, messages, False, template_kwargs)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = _render(tokenizer, messages[:i], True, template_kwargs)
        end = _render(tokenizer, messages[: i + 1], False, template_kwargs)
        if not (full.startswith(start) and full.startswith(end) and len(end) > len(start)):
            raise ValueError(
                f"chat template of {getattr(tokenizer, 'name_or_path', '?')!r} does not render turn {i} as a prefix of "
                "the whole conversation; cannot locate the assistant tokens for masking"
            )
        spans.append((len(start), len(end)))
    return full, spans


def _labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE] * len(ids)
    for s, e in spans:
        for j, (a, b) in enumerate(offsets):
            if a < s < b or a < e < b:
                raise ValueError(f"token {j} spans chars [{a}, {b}) across an assistant-turn boundary ({s} or {e})")
            if s <= a and b <= e and b > a:
                labels[j] = ids[j]
    return labels


def encode_conversation(tokenizer, messages: Sequence[dict], **template_kwargs) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only assistant tokens (others are -100)."""
    return _encode_many(tokenizer, [messages], template_kwargs)[0]


def _encode_many(tokenizer, conversations, template_kwargs) -> list[tuple[list[int], list[int]]]:
    rendered = [assistant_char_spans(tokenizer, msgs, **template_kwargs) for msgs in conversations]
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    return [
        (list(ids), _labels_from_offsets(list(ids), [tuple(o) for o in offs], spans))
        for ids, offs, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered)
    ]


@dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: list[list[int]]
    n_dropped_too_long: int = 0


def encode_dataset(
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    max_length: int,
    progress: bool = False,
    chunk: int = 1024,
    **template_kwargs,
) -> Encoded:
    """Encode every conversation (batched tokenisation); ones longer than `max_length` tokens are dropped, counted."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("SFT masking needs a fast tokenizer (character offsets); got a slow one")
    out = Encoded([], [])
    bar = tqdm(total=len(conversations), desc="encoding", unit="conv", disable=not progress, leave=False)
    for lo in range(0, len(conversations), chunk):
        try:
            pairs = _encode_many(tokenizer, conversations[lo : lo + chunk], template_kwargs)
        except ValueError:  # find the row for the message
            for k in range(lo, min(lo + chunk, len(conversations))):
                try:
                    _encode_many(tokenizer, [conversations[k]], template_kwargs)
                except ValueError as row_err:
                    raise ValueError(f"conversation {k}: {row_err}") from None
            raise
        for ids, labels in pairs:
            if len(ids) > max_length:
                out.n_dropped_too_long += 1
                continue
            out.input_ids.append(ids)
            out.labels.append(labels)
        bar.update(len(pairs))
    bar.close()
    if not out.input_ids:
        raise ValueError(f"no conversation fits max_length={max_length} ({out.n_dropped_too_long} too long)")
    return out


def collate(input_ids: Sequence[list[int]], labels: Sequence[list[int]], pad_id: int):
    """Right-pad a micro-batch; returns (input_ids, attention_mask, labels) tensors."""
    L = max(len(x) for x in input_ids)
    B = len(input_ids)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    lab = torch.full((B, L), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        ids[i, : len(x)] = torch.as_tensor(x)
        lab[i, : len(y)] = torch.as_tensor(y)
        mask[i, : len(x)] = 1
    return ids, mask, lab


def _has_plain_head(model) -> bool:
    """True when logits are exactly `lm_head(last hidden state)` (Llama, Qwen2/3, Mistral...), so the loss can be
    computed from hidden states in chunks; models that rescale or soft-cap logits take the plain path."""
    cfg = getattr(model, "config", None)
    return (
        getattr(model, "base_model", None) is not None
        and model.base_model is not model
        and model.get_output_embeddings() is not None
        and getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) is None
    )


def token_loss_sum(model, ids, mask, labels, chunk_tokens: int = 2048) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over labelled positions, and how many there are.

    Only labelled positions get logits, `chunk_tokens` at a time, each chunk recomputed in backward (activation
    checkpointing): peak extra memory is chunk_tokens x vocab instead of batch x length x vocab float32 logits.
    """
    target = labels[:, 1:]
    sel = target != IGNORE
    n = int(sel.sum())
    if not _has_plain_head(model):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        return F.cross_entropy(logits[sel].float(), target[sel], reduction="sum"), n
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][sel]  # [M, d]
    y = target[sel]
    head = model.get_output_embeddings()

    def chunk_loss(h, t):
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for lo in range(0, n, chunk_tokens):
        total = total + checkpoint(
            chunk_loss, hidden[lo : lo + chunk_tokens], y[lo : lo + chunk_tokens], use_reentrant=False
        )
    return total, n


def _as_tuple(state):
    """random.Random state from its pickled or JSON form (nested lists back to tuples)."""
    return tuple(_as_tuple(x) for x in state) if isinstance(state, list | tuple) else state


def train_sft(
    model,
    data: Encoded,
    config: SFTConfig,
    *,
    pad_token_id: int,
    evaluate: Callable[[object, int], dict] | None = None,
    on_log: Callable[[dict], None] | None = None,
    run=None,
) -> list[dict]:
    """Train `model` in place; returns the log records (one per log/eval step, plus a final one).

    Batches are drawn by shuffling the data each epoch with `config.seed`. With `run` (`opd.sft.resume.SFTRun`,
    what `opd sft` passes) the loop resumes from the run's newest intact checkpoint, logs through it and
    checkpoints every `run.save_steps` steps; the records returned are then this session's.
    """
    n = len(data.input_ids)
    total = config.steps or max(1, math.ceil(config.epochs * n / config.batch_size))
    micro = config.micro_batch_size or config.batch_size
    device = next(model.parameters()).device
    opt = make_optimizer(
        model, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, decay_1d_params=False
    )
    sched = make_scheduler(
        opt, kind="cosine", total_steps=total, warmup_ratio=config.warmup_ratio, min_lr_ratio=config.min_lr_ratio
    )
    rng = random.Random(config.seed)
    order: list[int] = []
    logs: list[dict] = []
    first = 0
    if run is not None and (restored := run.restore(model, opt, sched)) is not None:
        first, order = restored["step"], list(restored["order"])
        rng.setstate(_as_tuple(restored["rng"]))
    t0 = time.perf_counter()
    model.train()

    def record(rec: dict) -> None:
        logs.append(rec)
        if on_log is not None:
            on_log(rec)
        if run is not None:
            run.log(rec)

    bar = tqdm(range(first, total), initial=first, total=total, desc="sft", unit="step", disable=not config.progress)
    for step in bar:
        while len(order) < config.batch_size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order.extend(epoch)
        batch, order = order[: config.batch_size], order[config.batch_size :]
        chunks = [batch[i : i + micro] for i in range(0, len(batch), micro)]
        n_tokens = sum(sum(t != IGNORE for t in data.labels[j][1:]) for j in batch)
        if n_tokens == 0:
            raise ValueError(f"step {step}: batch has no assistant tokens to train on")
        opt.zero_grad(set_to_none=True)
        loss_total = 0.0
        for chunk in chunks:
            ids, mask, lab = collate([data.input_ids[j] for j in chunk], [data.labels[j] for j in chunk], pad_token_id)
            loss_sum, _ = token_loss_sum(model, ids.to(device), mask.to(device), lab.to(device))
            (loss_sum / n_tokens).backward()
            loss_total += float(loss_sum.detach())
        grad_norm = clip_grad_norm(model.parameters(), config.grad_clip or float("inf"))
        if math.isfinite(grad_norm):
            opt.step()
        sched.step()
        rec = {
            "step": step + 1,
            "loss": loss_total / n_tokens,
            "lr": opt.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens": n_tokens,
            "elapsed_s": time.perf_counter() - t0,
        }
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        is_eval = bool(config.eval_every) and evaluate is not None and (step + 1) % config.eval_every == 0
        if is_eval:
            rec.update(evaluate(model, step + 1))
            model.train()
        if is_eval or (step + 1) % config.log_every == 0 or step + 1 == total:
            record(rec)
        if is_eval and config.stop_threshold is not None:
            if config.stop_metric not in rec:
                raise KeyError(
                    f"evaluate() returned {sorted(rec)}; SFTConfig.stop_metric={config.stop_metric!r} is missing"
                )
            if rec[config.stop_metric] >= config.stop_threshold:
                rec["stopped_early"] = True
                if logs[-1] is not rec:
                    record(rec)
                break
        if run is not None:
            run.after_step(step + 1, total, model=model, optimizer=opt, scheduler=sched, rng=rng, order=order)
    bar.close()
    model.eval()
    return logs
