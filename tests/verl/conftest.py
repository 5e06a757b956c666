"""Tiny verl test assets built in-process (nothing downloads): a ChatML byte-level tokenizer, a random tiny Qwen2
and the toy task's RL parquet files.

Why a ChatML tokenizer rather than the toy world's: verl picks its prompt/response token builder from the model
type, and for qwen2 it requires ``<|im_end|>`` and a newline that is one token, which a byte-level BPE gives.
The model is left near uniform on purpose (random init, std 0.02): a top-k filter leaking into the rollout then
shows up as a large rollout/trainer probability gap.
"""

from __future__ import annotations

import pytest

PAD, EOS, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
CHATML = ("{% for message in messages %}" + IM_START + "{{ message['role'] }}\n{{ message['content'] }}" + EOS +
          "\n{% endfor %}{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}")


def build_chatml_tokenizer(out_dir, vocab_size: int = 320):
    """A byte-level BPE (Qwen2's pre-tokenizer) trained on the toy task's text, with ChatML specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from opd.toy.task import corpus

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, IM_START, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(corpus(n=500), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=PAD, eos_token=EOS, unk_token=PAD,
                                  additional_special_tokens=[IM_START], chat_template=CHATML, model_max_length=512,
                                  padding_side="left", clean_up_tokenization_spaces=False)
    tok.save_pretrained(out_dir)
    return tok


@pytest.fixture(scope="session")
def verl_assets(tmp_path_factory):
    """Paths: `model` (tiny Qwen2 + tokenizer folder), `other` (same shape, other seed), `train`/`val` parquet."""
    from opd.toy import build_tiny_model, save_model
    from opd.toy.task import make_splits, rl_rows, write_parquet

    root = tmp_path_factory.mktemp("verl_assets")
    tok = build_chatml_tokenizer(root / "tokenizer")
    paths = {}
    for name, seed in (("model", 0), ("other", 1)):
        paths[name] = save_model(build_tiny_model(tok, size="student", seed=seed, arch="qwen2"), tok, root / name)
    splits = make_splits(seed=0, n_train=32, n_dev=8, n_test=1)
    paths["train"] = str(write_parquet(rl_rows(splits["train"], "train"), root / "train.parquet"))
    paths["val"] = str(write_parquet(rl_rows(splits["dev"], "dev"), root / "val.parquet"))
    paths["root"] = str(root)
    return paths
