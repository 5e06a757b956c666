"""KV-cached batched sampling for any Hugging Face causal LM: the transformers rollout backend.

Why our own loop rather than `model.generate`: it is ~2x faster for tiny models (no per-step processor stack), the
random stream is one explicit `torch.Generator` (so a resumed run replays the same samples), and it returns exactly the
response token ids the trainer needs (EOS included when generated, nothing after it).
Prompts are left-padded so every row's next token sits in the last column; position ids skip the padding.
"""

from __future__ import annotations

import sys
import weakref
from array import array
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm


def render_prompt_ids(tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    """Token ids of a chat prompt rendered with the tokenizer's chat template (+ generation prompt).

    Rendering to text first and tokenising without special tokens keeps a template's own BOS from being doubled.
    `template_kwargs` (e.g. enable_thinking=True) go to the template.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template; cannot render prompts"
        )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _filter_top_p(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the smallest set whose probability reaches top_p."""
    sorted_logits, sorted_idx = torch.sort(logits_BV, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # drop a token when the mass *before* it already reaches top_p (the top-1 token always stays)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
    return logits_BV.masked_fill(drop, float("-inf"))


def _apply_repetition_penalty(logits_BV: torch.Tensor, seen_BL: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the row (prompt or response); -1 entries are padding."""
    counts = torch.zeros(logits_BV.shape, dtype=torch.long, device=logits_BV.device)
    counts.scatter_add_(-1, seen_BL.clamp_min(0), (seen_BL >= 0).long())
    penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(counts > 0, penalised, logits_BV)


def next_token_logits_to_ids(
    logits_BV: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample one token per row (greedy when temperature == 0)."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits = logits_BV.float()
    if temperature != 1.0:  # x / 1.0 is x: one op less per token at the usual temperature
        logits = logits / temperature
    if top_p < 1.0:
        logits = _filter_top_p(logits, top_p)
    return sample_from_probs(logits.softmax(-1), generator)


def sample_from_probs(probs_BV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from `probs_BV`, by inverting the row's float64 cumulative distribution at one uniform draw.

    The exact distribution (float64 resolves probabilities far below float32's), one random number per row:
    torch.multinomial draws an exponential for every vocabulary entry, 19 ms for 8 rows at V = 151,936 on one CPU
    thread against 1.7 ms here (docs/benchmarks.md), most of a decode step at that vocabulary. A row whose mass is
    not finite (NaN or inf logits) is refused instead of sampled."""
    cdf = probs_BV.double().cumsum(-1)
    u = torch.rand((probs_BV.shape[0], 1), generator=generator, dtype=torch.float64, device=probs_BV.device)
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    if bool((ids >= probs_BV.shape[-1]).any()):  # u < 1, so only a NaN total gets past the last entry
        raise ValueError("the model's next-token distribution is not finite (NaN or inf logits): cannot sample")
    return ids


@torch.no_grad()
def sample(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    progress: bool = False,
    observe: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Sample one response per prompt (repeat a prompt n times for n samples).

    Returns the response ids per prompt, in prompt order, each ending at (and including) its first EOS, or
    `max_new_tokens` long when truncated. The model is put in eval mode for the call and restored afterwards.
    `observe(first_row, step, logits_BV, token_B)`, when given, sees the model's raw next-token logits (before
    temperature, top-p or repetition penalty) of rows first_row.. at each response position, with the sampled
    token: a trainer reads the sampling policy's statistics there instead of re-running the model.
    `compile`: decode with a `torch.compile`d step over a static KV cache (faster for small models after a one-time
    compilation; samples may differ from eager ones in the last bits, hence off by default; falls back to eager
    decoding where it cannot compile).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    eos = torch.tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids))
    device = next(model.parameters()).device
    eos = eos.to(device)
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    bar = tqdm(total=len(prompts), desc="sampling", unit="seq", disable=not progress, leave=False)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            out.extend(
                _sample_batch(
                    model,
                    chunk,
                    max_new_tokens,
                    eos,
                    pad_token_id,
                    temperature,
                    top_p,
                    repetition_penalty,
                    generator,
                    device,
                    None if observe is None else (lambda *a, first=start: observe(first, *a)),
                    compile,
                )
            )
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return out


class _DynamicDecoder:
    """The default decoding: the model's own (dynamic) KV cache, a growing attention mask, eager forwards."""

    def __init__(self, model, attn_BL: torch.Tensor):
        self.model, self.attn, self.past = model, attn_BL, None

    def prefill(self, input_ids_BL, position_ids_BL) -> torch.Tensor:
        outputs = self.model(
            input_ids=input_ids_BL,
            attention_mask=self.attn,
            position_ids=position_ids_BL,
            use_cache=True,
            logits_to_keep=1,
        )
        self.past = outputs.past_key_values
        return outputs.logits[:, -1, :]

    def step(self, tok_B, pos_B) -> torch.Tensor:
        B = tok_B.shape[0]
        self.attn = torch.cat([self.attn, torch.ones((B, 1), dtype=self.attn.dtype, device=self.attn.device)], dim=1)
        outputs = self.model(
            input_ids=tok_B[:, None],
            attention_mask=self.attn,
            position_ids=pos_B[:, None],
            past_key_values=self.past,
            use_cache=True,
        )
        self.past = outputs.past_key_values
        return outputs.logits[:, -1, :]


# --- compiled decoding (opt-in) ----------------------------------------------------------------------------------
# A decode step of a small model is mostly Python and dispatch overhead (~0.5 ms per token for the toy models on one
# CPU thread, most of the step at a small vocabulary); `torch.compile` of one decode step over a static KV cache
# (fixed shapes: one compilation per batch size and cache length) runs it ~2.5x faster (docs/benchmarks.md). The
# compiled kernels round differently from eager ones, so the samples of a seed can differ from the eager sampler's:
# it is off by default, and a model or machine where it cannot compile (no C++ compiler, a model without a static
# cache) falls back to eager decoding, saying so once.
STATIC_CACHE_ROUND = 64  # cache lengths are rounded up to a multiple of this, so changing prompt lengths reuse one
# model -> (its compiled decode step, the (batch, cache length) shapes that step has run), or None: cannot compile
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cache_length(prompt_width: int, max_new_tokens: int) -> int:
    return -(-(prompt_width + max_new_tokens) // STATIC_CACHE_ROUND) * STATIC_CACHE_ROUND


def _compiled_step(model):
    if model not in _COMPILED:

        def step(tok_B1, attn_BC, pos_B1, cache_position, cache):
            out = model(
                input_ids=tok_B1,
                attention_mask=attn_BC,
                position_ids=pos_B1,
                past_key_values=cache,
                cache_position=cache_position,
                use_cache=True,
            )
            return out.logits[:, -1, :]

        _COMPILED[model] = (torch.compile(step, dynamic=False), set())
    return _COMPILED[model][0]


class _CompiledDecoder:
    """Decoding over a static KV cache with a compiled decode step (the prefill stays eager)."""

    def __init__(self, model, attn_BL: torch.Tensor, max_new_tokens: int):
        from transformers import StaticCache

        B, L = attn_BL.shape
        length = _cache_length(L, max_new_tokens)
        self.model, self.L, self.n = model, L, 0
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.attn = torch.zeros((B, length), dtype=attn_BL.dtype, device=attn_BL.device)
        self.attn[:, :L] = attn_BL
        self.fn = _compiled_step(model)

    def prefill(self, input_ids_BL, position_ids_BL) -> torch.Tensor:
        outputs = self.model(
            input_ids=input_ids_BL,
            attention_mask=self.attn[:, : self.L],
            position_ids=position_ids_BL,
            past_key_values=self.cache,
            cache_position=torch.arange(self.L, device=input_ids_BL.device),
            use_cache=True,
            logits_to_keep=1,
        )
        return outputs.logits[:, -1, :]

    def step(self, tok_B, pos_B) -> torch.Tensor:
        at = self.L + self.n
        self.n += 1
        self.attn[:, at] = 1
        cache_position = torch.tensor([at], device=tok_B.device)
        return self.fn(tok_B[:, None], self.attn, pos_B[:, None], cache_position, self.cache)


def _can_compile(model, attn_BL: torch.Tensor, max_new_tokens: int) -> bool:
    """Whether a compiled decoder runs for this model and shape here. The first time for a (batch, cache length)
    shape it is built and run once on a scratch cache (this is where the compilation happens), so a failure costs
    no sampled token. Said once per model when it cannot."""
    if model in _COMPILED and _COMPILED[model] is None:
        return False
    shape = (attn_BL.shape[0], _cache_length(attn_BL.shape[1], max_new_tokens))
    if model in _COMPILED and shape in _COMPILED[model][1]:
        return True
    try:
        probe = _CompiledDecoder(model, attn_BL, max_new_tokens)
        zeros = torch.zeros(shape[0], dtype=torch.long, device=attn_BL.device)
        probe.step(zeros, zeros)
    except Exception as exc:  # noqa: BLE001 - any failure to build or compile means: decode eagerly
        _COMPILED[model] = None
        print(
            f"opd: note: compiled sampling is not available for this model here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); sampling eagerly",
            file=sys.stderr,
        )
        return False
    _COMPILED[model][1].add(shape)
    return True


def _sample_batch(
    model,
    prompts,
    max_new_tokens,
    eos,
    pad_id,
    temperature,
    top_p,
    rep_penalty,
    generator,
    device,
    observe=None,
    compile=False,
):
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("empty prompt (0 tokens) cannot be sampled from")
    L = max(lengths)
    # left padding laid out in flat lists, one conversion each (per-row tensor writes cost ~10 us a row)
    ids, mask = [], []
    for p, n in zip(prompts, lengths):
        ids += [pad_id] * (L - n)
        ids += p
        mask += [0] * (L - n) + [1] * n
    input_ids = torch.frombuffer(array("q", ids), dtype=torch.long).view(B, L).to(device)
    attn = torch.frombuffer(array("q", mask), dtype=torch.long).view(B, L).to(device)
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    seen = input_ids.masked_fill(attn == 0, -1) if rep_penalty != 1.0 else None

    if compile and max_new_tokens > 1 and _can_compile(model, attn, max_new_tokens):
        decoder = _CompiledDecoder(model, attn, max_new_tokens)
    else:
        decoder = _DynamicDecoder(model, attn)
    logits = decoder.prefill(input_ids, position_ids)
    # EOS lookup by sampled id (always < V) rather than `isin` per token; ids outside the vocabulary are never sampled
    eos_ids = eos.tolist()
    V = logits.shape[-1]
    is_eos = torch.zeros(V, dtype=torch.bool, device=device)
    is_eos[[int(e) for e in eos_ids if 0 <= e < V]] = True
    next_pos = position_ids[:, -1] + 1
    done = torch.zeros(B, dtype=torch.bool, device=device)
    toks = []
    for step in range(max_new_tokens):
        raw = logits
        if seen is not None:
            logits = _apply_repetition_penalty(logits.float(), seen, rep_penalty)
        sampled = next_token_logits_to_ids(logits, temperature=temperature, top_p=top_p, generator=generator)
        tok = sampled.masked_fill(done, pad_id)
        if observe is not None:
            observe(step, raw, tok)
        toks.append(tok)
        done |= is_eos[sampled]  # a finished row stays finished whatever it sampled
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if seen is not None:
            seen = torch.cat([seen, tok.masked_fill(done, -1)[:, None]], dim=1)
        logits = decoder.step(tok, next_pos)
        next_pos = next_pos + 1
    # a row ends at its first EOS (nothing before it was one; padding after it may be) or runs every step
    stop = set(eos_ids)
    out = []
    for row in torch.stack(toks, 1).cpu().tolist():
        out.append(row[: next((j + 1 for j, t in enumerate(row) if t in stop), len(row))])
    return out
