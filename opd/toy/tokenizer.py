"""A small byte-level BPE tokenizer with a chat template, trained locally on the toy task's text (no download).

Why not a 17-symbol character vocabulary: with so few symbols a top-16 support is the whole vocabulary, so the
top-k overlap ratio says nothing (docs/demo.md). A few hundred tokens (the 256 byte symbols plus merges learned on
the task text) exercise the same code path as a real tokenizer: chat template, special tokens, save/reload.

Digits are always single tokens, as in several modern LLM tokenizers, so the arithmetic is not hidden inside
arbitrary multi-digit merges. The normaliser and pre-tokeniser are exactly the ones transformers' `Qwen2Tokenizer`
rebuilds (NFC, Qwen2's split pattern, byte level) and `<|endoftext|>` is in the vocabulary, because
`AutoTokenizer.from_pretrained` on a Qwen2 model folder always re-creates a `Qwen2Tokenizer` from vocab + merges:
this way a Llama folder and a Qwen2 folder reload to the same token ids. Training is deterministic: the same
corpus gives the same vocabulary.
"""

from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from opd.toy.task import corpus

PAD, EOS, USER, ASSISTANT, SYSTEM = "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"
UNK = "<|endoftext|>"  # never produced (byte-level BPE covers every input); present for Qwen2Tokenizer
SPECIAL_TOKENS = [PAD, EOS, USER, ASSISTANT, SYSTEM, UNK]
VOCAB_SIZE = 384

# `{% generation %}` marks the assistant tokens, so `apply_chat_template(..., return_assistant_tokens_mask=True)`
# works too; the SFT trainer itself finds assistant spans by rendering prefixes (works with any template).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    + SYSTEM
    + "{{ message['content'] }}"
    + EOS
    + "{%- elif message['role'] == 'user' -%}"
    + USER
    + "{{ message['content'] }}"
    + EOS
    + "{%- elif message['role'] == 'assistant' -%}"
    + ASSISTANT
    + "{% generation %}{{ message['content'] }}"
    + EOS
    + "{% endgeneration %}"
    "{%- else -%}{{ raise_exception('toy chat template: unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


def _train_raw(vocab_size: int, texts: list[str] | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() if texts is None else texts, trainer=trainer)
    return tok


def build_toy_tokenizer(
    out_dir: str | os.PathLike | None = None, vocab_size: int = VOCAB_SIZE, texts: list[str] | None = None
):
    """Train the toy BPE (on `texts`, default the demo task's text) and wrap it as a transformers fast tokenizer;
    save it to `out_dir` if given.

    The saved folder reloads offline with `AutoTokenizer.from_pretrained(out_dir)`.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_raw(vocab_size, texts),
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tok.save_pretrained(out_dir)
    return tok
