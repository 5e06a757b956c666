"""Load an exported dataset with LlamaFactory's own loader and print what it would train on (JSON on stdout).

Run with the Python of an environment where llamafactory is installed (it cannot share ours: transformers pin):
  python tests/data/lf_load_check.py TRAIN.yaml TOKENIZER_DIR OUTPUT_DIR
The YAML is our shipped SFT config as written by `opd data export-llamafactory --yaml-out`; DeepSpeed and bf16 are
switched off so it runs on CPU, and the tiny local tokenizer stands in for the base student's.
"""

import importlib.machinery
import json
import sys
import types

try:  # LlamaFactory 0.9.5 imports torchaudio at module level; text SFT never calls it (CPU envs drop torchaudio)
    import torchaudio  # noqa: F401
except ImportError:
    stub = types.ModuleType("torchaudio")
    stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)  # transformers probes find_spec()
    sys.modules["torchaudio"] = stub

import yaml
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer


def main(yaml_path: str, tokenizer_dir: str, output_dir: str) -> None:
    cfg = yaml.safe_load(open(yaml_path, encoding="utf-8"))
    cfg.pop("deepspeed", None)
    cfg.update(
        model_name_or_path=tokenizer_dir,
        bf16=False,
        preprocessing_num_workers=None,
        dataloader_num_workers=0,
        output_dir=output_dir,
        cutoff_len=512,
        overwrite_output_dir=True,
    )
    model_args, data_args, training_args, _, _ = get_train_args(cfg)
    tm = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tm["tokenizer"], data_args)
    dm = get_dataset(template, model_args, data_args, training_args, stage="sft", **tm)
    tok = tm["tokenizer"]
    rows = []
    for split in ("train_dataset", "eval_dataset"):
        for ex in dm[split]:
            rows.append(
                {
                    "split": split,
                    "input": tok.decode(ex["input_ids"]),
                    "target": tok.decode([t for t in ex["labels"] if t != -100]),
                }
            )
    print("LF_RESULT " + json.dumps(rows))


if __name__ == "__main__":
    main(*sys.argv[1:4])
