"""Model shapes the benchmarks build with random weights (nothing is downloaded), so the same script measures the
toy models on a CPU and a real model's shape on a GPU.

    toy              opd.toy's teacher (3 layers, d = 64) and student (2 layers, d = 64), Llama-style
    qwen3-0.6b       Qwen3-0.6B's shape (28 layers, d = 1,024, GQA 16/8 heads of 128, MLP 3,072, tied embeddings)
    qwen3-1.7b       Qwen3-1.7B's shape (28 layers, d = 2,048, GQA 16/8 heads of 128, MLP 6,144, tied embeddings)

A pair is "<teacher>:<student>" (e.g. qwen3-1.7b:qwen3-0.6b); the vocabulary is the toy tokenizer's or padded to
`vocab` rows (151,936 is Qwen's), and `layers` overrides the depth (a CPU smoke run of a real shape).
"""

from __future__ import annotations

QWEN_VOCAB = 151936

# transformers Qwen3Config fields of the released models (their config.json), weights random
QWEN3 = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
}
SHAPES = ("toy", *QWEN3)


def parse_pair(text: str) -> tuple[str, str]:
    """'<teacher>:<student>' (or one shape for both roles' families: 'toy') -> (teacher shape, student shape)."""
    teacher, _, student = text.partition(":")
    student = student or teacher
    for shape in (teacher, student):
        if shape not in SHAPES:
            raise ValueError(f"model shape {shape!r} is not valid; allowed: {', '.join(SHAPES)}")
    return teacher, student


def random_model(tokenizer, shape: str, role: str, *, seed: int, vocab: int | None = None, layers: int | None = None):
    """A random-init causal LM (float32, sdpa attention) of `shape`; `role` picks the toy size (teacher / student).
    Its special ids are the tokenizer's; `vocab` pads the vocabulary (default: the tokenizer's)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from opd.toy import tiny_config

    if shape == "toy":
        config = tiny_config(tokenizer, size=role, arch="llama")
        if layers is not None:
            config.num_hidden_layers = layers
    else:
        dims = dict(QWEN3[shape], **({} if layers is None else {"num_hidden_layers": layers}))
        config = Qwen3Config(
            **dims,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    if vocab is not None:
        config.vocab_size = vocab
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding (a lookup), with a tied output
    embedding counted once, as the head's matmul. 6 x this x tokens is the usual forward + backward FLOPs estimate
    (attention's own score and value products excluded: small next to it at a few thousand positions)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied matrix is listed once: it serves as the head
    return total if head is embed else total - embed.numel()
