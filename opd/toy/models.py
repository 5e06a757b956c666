"""Tiny Llama / Qwen2 causal LMs built from a config (no weights to download) for the toy world and for tests.

A size is (layers, width), with 32-wide attention heads and a SwiGLU MLP of about 8/3 the width (the usual
parameter-matched choice). The teacher is 3 layers of width 64 (169k parameters), the student 2 layers of width 64
(118k): on the slow 2-core host a width-96 teacher (the earlier 4-digit world's) learnt no better and cost 1.6x per
step, which the demo's time budget could not pay. "tiny" (1 layer, width 32) is for unit tests. Embeddings are tied: at
these sizes the vocabulary matrix would otherwise be a large share of the parameters.
"""

from __future__ import annotations

import os

import torch

SIZES = {"teacher": (3, 64), "student": (2, 64), "tiny": (1, 32)}  # name -> (layers, width)
ARCHS = ("llama", "qwen2")
HEAD_DIM = 32


def dims(layers: int, width: int) -> dict[str, int]:
    """Every transformers size field derived from (layers, width)."""
    if layers < 1 or width < HEAD_DIM or width % HEAD_DIM:
        raise ValueError(
            f"need layers >= 1 and a width that is a positive multiple of {HEAD_DIM}; "
            f"got layers={layers}, width={width}"
        )
    return {
        "num_hidden_layers": layers,
        "hidden_size": width,
        "num_attention_heads": width // HEAD_DIM,
        "num_key_value_heads": width // HEAD_DIM,
        "intermediate_size": -(-8 * width // 3 // 16) * 16,  # 8/3 width rounded up to a multiple of 16
    }


def tiny_config(tokenizer, size: str = "student", arch: str = "llama", max_positions: int = 512):
    """A transformers config of the named size whose vocabulary and special ids match `tokenizer`."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not valid; allowed: {', '.join(SIZES)}")
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not valid; allowed: {', '.join(ARCHS)}")
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        **dims(*SIZES[size]),
    )
    if arch == "llama":
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    return Qwen2Config(**common, use_sliding_window=False)


def build_tiny_model(tokenizer, size: str = "student", seed: int = 0, arch: str = "llama"):
    """A freshly initialised tiny causal LM; `seed` alone fixes its weights (the global RNG is left untouched)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(tokenizer, size=size, arch=arch)
    config._attn_implementation = "sdpa"
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> str:
    """Save model and tokenizer side by side, so `from_pretrained(out_dir)` reloads both offline."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def load_model(path: str | os.PathLike):
    """Reload a model + tokenizer folder written by `save_model` (float32, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tok


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
