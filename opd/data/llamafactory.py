"""`opd data export-llamafactory`: register teacher rollouts as a LlamaFactory SFT dataset (docs/workflow.md §5).

The rollout JSONL from `opd rollout` is already in the ShareGPT/OpenAI `messages` layout. This tool checks every
line (user/assistant alternation, optional leading system turn, ends with the assistant), places the file in the
dataset folder as `<name>.jsonl`, and adds (or replaces) the `<name>` entry of that folder's `dataset_info.json`
(formatting sharegpt, column `messages`, role/content tags), so the dataset name and file name always agree.
With --yaml-out it also writes a copy of configs/llamafactory/qwen3_full_sft_cold_start.yaml (full SFT of a base
student with the paper's settings) whose dataset, dataset_dir, model and output_dir point at this export.
LlamaFactory itself runs in its own environment (it pins transformers <= 5.6.0, which verl does not accept):

  opd data export-llamafactory --rollouts sft/qwen3_4b_answers.jsonl --dataset-dir data/llamafactory \\
      --yaml-out sft_cold_start.yaml --model-name-or-path Qwen/Qwen3-1.7B-Base --output-dir saves/cold_start
  llamafactory-cli train sft_cold_start.yaml     # in the LlamaFactory environment
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from opd.data.schema import DataError
from opd.errors import UsageError, command
from opd.io import atomic_path, atomic_write_text

YAML_NAME = "qwen3_full_sft_cold_start.yaml"


def dataset_entry(file_name: str) -> dict:
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    }


def check_rollouts(path: Path) -> int:
    """Raise DataError at the first line LlamaFactory would skip or misread; return the number of examples."""
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = {"file": path, "row": lineno - 1, "column": "messages"}
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"line {lineno} is not JSON ({e.msg})", file=path, row=lineno - 1) from e
            msgs = rec.get("messages") if isinstance(rec, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"line {lineno}: expected a non-empty 'messages' list", **where)
            turns = msgs[1:] if isinstance(msgs[0], dict) and msgs[0].get("role") == "system" else msgs
            for k, m in enumerate(turns):
                want = "user" if k % 2 == 0 else "assistant"
                if not isinstance(m, dict) or m.get("role") != want or not isinstance(m.get("content"), str):
                    raise DataError(
                        f"line {lineno}: turn {k} should be a {want} message with string content, got {m!r}"[:200],
                        **where,
                    )
            if len(turns) % 2 or not turns[-1]["content"].strip():
                raise DataError(f"line {lineno}: must end with a non-empty assistant message", **where)
            n += 1
    if n == 0:
        raise DataError("no examples", file=path)
    return n


def export(rollouts: str | Path, dataset_dir: str | Path, name: str | None = None) -> tuple[Path, int]:
    """Copy (atomically) the checked rollouts to <dataset_dir>/<name>.jsonl and register <name>; return (file, n)."""
    rollouts, dataset_dir = Path(rollouts), Path(dataset_dir)
    if not rollouts.is_file():
        raise DataError("no such file", file=rollouts)
    name = name or rollouts.stem
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"--name {name!r}: use letters, digits, '_', '-', '.' only")
    n = check_rollouts(rollouts)
    target = dataset_dir / f"{name}.jsonl"
    info_path = dataset_dir / "dataset_info.json"
    info = {}
    if info_path.exists():  # read before anything is copied: a bad one leaves the dataset folder as it was
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"existing dataset_info.json is not valid JSON ({e.msg})", file=info_path) from e
        if not isinstance(info, dict):
            raise DataError("existing dataset_info.json must hold a JSON object", file=info_path)
    if rollouts.resolve() != target.resolve():
        with atomic_path(target) as tmp:
            shutil.copyfile(rollouts, tmp)
    info[name] = dataset_entry(target.name)
    atomic_write_text(info_path, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return target, n


def default_yaml() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "llamafactory" / YAML_NAME


def render_yaml(template_text: str, values: dict[str, str]) -> str:
    """Set top-level `key: value` lines of the shipped YAML, keeping its comments and order."""
    out = template_text
    for key, value in values.items():
        pattern = re.compile(rf"^{re.escape(key)}:.*$", re.MULTILINE)
        if not pattern.search(out):
            raise ValueError(f"the LlamaFactory YAML has no top-level '{key}:' line to fill in")
        out = pattern.sub(f"{key}: {json.dumps(str(value))}", out, count=1)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd data export-llamafactory",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--rollouts", required=True, help="JSONL from `opd rollout` ({'messages': [...]} per line)")
    p.add_argument("--dataset-dir", required=True, help="LlamaFactory dataset folder (holds dataset_info.json)")
    p.add_argument("--name", help="dataset name (default: the rollouts file stem); the file becomes <name>.jsonl")
    p.add_argument("--yaml-out", help="also write a training YAML for this dataset")
    p.add_argument("--yaml-template", help=f"YAML to start from (default: configs/llamafactory/{YAML_NAME})")
    p.add_argument("--model-name-or-path", help="base student for --yaml-out (default: keep the YAML's)")
    p.add_argument("--output-dir", help="checkpoint folder for --yaml-out (default: keep the YAML's)")
    return p


@command("opd data export-llamafactory")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    src = Path(args.yaml_template) if args.yaml_template else default_yaml()
    if args.yaml_out and not src.is_file():  # checked before the export writes anything
        raise UsageError(f"YAML template {src} not found (pass --yaml-template)")
    target, n = export(args.rollouts, args.dataset_dir, args.name)
    name = target.stem
    if args.yaml_out:
        values = {"dataset": name, "dataset_dir": str(Path(args.dataset_dir).resolve())}
        ds = src.parent / "ds_z2_config.json"
        if ds.is_file():
            values["deepspeed"] = str(ds.resolve())
        if args.model_name_or_path:
            values["model_name_or_path"] = args.model_name_or_path
        if args.output_dir:
            values["output_dir"] = args.output_dir
        atomic_write_text(args.yaml_out, render_yaml(src.read_text(encoding="utf-8"), values))
    print(
        json.dumps(
            {
                "dataset": name,
                "file": str(target),
                "examples": n,
                "dataset_info": str(Path(args.dataset_dir) / "dataset_info.json"),
                **({"yaml": args.yaml_out} if args.yaml_out else {}),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
