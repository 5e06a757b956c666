"""Loading the student, teacher and reference for the local engine, after checking they share one vocabulary.

The teacher scores the student's exact token ids and both models' top-k ids index each other's logits, so the
vocabularies must match token for token. The check reads only the tokenizers and configs (cheap), so a mismatch is
reported before any weights are loaded. Embedding matrices may be padded past the tokenizer (e.g. Qwen models of
different sizes pad to 151,936 or 152,064 rows): the engine then reads both models' logits over the common width,
which holds every real token.
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class VocabularyMismatchError(ValueError):
    pass


def require_model_dir(path: str | None, variable: str, role: str) -> Path:
    if not path:
        raise ValueError(
            f"{variable} is not set: the local engine needs the {role} as a local Hugging Face model folder. "
            f"For a toy world that needs no download, run `opd demo` (it builds a teacher and a student), "
            f"then point {variable} at the folder it prints"
        )
    folder = Path(path)
    if not (folder / "config.json").is_file():
        # a training checkpoint keeps the model one level down, beside the optimiser and RNG states
        hint = f"; {folder / 'model'} is one" if (folder / "model" / "config.json").is_file() else ""
        raise FileNotFoundError(
            f"{variable}={path}: expected a local Hugging Face model folder with a config.json{hint} (nothing is "
            f"downloaded; `opd demo` builds toy models)"
        )
    return folder


def check_vocabularies(student_path: Path, teacher_path: Path | None):
    """Load the student tokenizer; with a teacher, fail unless both vocabularies map every token to the same id.

    Returns (tokenizer, vocab_width): the logit width both models are read at (None: use the full width).
    """
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_path)
    if teacher_path is None:
        return tokenizer, None
    teacher_tok = AutoTokenizer.from_pretrained(teacher_path)
    s_vocab, t_vocab = tokenizer.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))
        only_t = sorted(set(t_vocab) - set(s_vocab))
        moved = sorted(tok for tok in set(s_vocab) & set(t_vocab) if s_vocab[tok] != t_vocab[tok])
        raise VocabularyMismatchError(
            f"student ({student_path}, {len(s_vocab)} tokens) and teacher ({teacher_path}, {len(t_vocab)} tokens) "
            f"do not share a vocabulary: {len(only_s)} tokens only in the student (e.g. {only_s[:3]}), "
            f"{len(only_t)} only in the teacher (e.g. {only_t[:3]}), {len(moved)} with different ids "
            f"(e.g. {moved[:3]}). OPD scores the student's token ids with the teacher, so both must use one tokenizer"
        )
    s_width = AutoConfig.from_pretrained(student_path).vocab_size
    t_width = AutoConfig.from_pretrained(teacher_path).vocab_size
    width = min(s_width, t_width)
    if len(s_vocab) > width:
        raise VocabularyMismatchError(
            f"the tokenizer has {len(s_vocab)} tokens but a model's output layer has only {width} rows "
            f"(student {s_width}, teacher {t_width})"
        )
    return tokenizer, (None if s_width == t_width else width)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_causal_lm(path: Path, *, dtype: str, device: torch.device, trainable: bool):
    """A causal LM on `device`; frozen models get requires_grad False and eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def special_ids(tokenizer, model) -> tuple[list[int], int]:
    """(EOS ids, pad id): the tokenizer's EOS plus the generation config's; pad falls back to the first EOS."""
    eos: list[int] = []
    if tokenizer.eos_token_id is not None:
        eos.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    for tok in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
        if int(tok) not in eos:
            eos.append(int(tok))
    if not eos:
        raise ValueError("the student tokenizer has no EOS token: rollouts could not stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return eos, int(pad)
