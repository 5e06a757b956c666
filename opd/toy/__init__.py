"""The embedded toy world: a verifiable 3-digit addition task, a locally trained tokenizer, tiny Llama/Qwen2 models.

Everything is generated on the machine (no download), deterministically from seeds, so tests and `opd demo` run
offline. See `opd.toy.task` (problems, gold solutions, RL parquet), `opd.toy.tokenizer` (BPE + chat template) and
`opd.toy.models` (configs from one size dial, save/load).
"""

from opd.toy.models import build_tiny_model, load_model, save_model, tiny_config
from opd.toy.task import Problem, gold_solution, make_splits, rl_rows, sample_problems, sft_messages, write_datasets
from opd.toy.tokenizer import build_toy_tokenizer

__all__ = [
    "Problem",
    "build_tiny_model",
    "build_toy_tokenizer",
    "gold_solution",
    "load_model",
    "make_splits",
    "rl_rows",
    "sample_problems",
    "save_model",
    "sft_messages",
    "tiny_config",
    "write_datasets",
]
