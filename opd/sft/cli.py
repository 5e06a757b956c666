"""`opd sft`: built-in full-parameter SFT of a causal LM on chat data, training only the assistant tokens.

Reads the ShareGPT/OpenAI-style records that `opd rollout` writes (`{"messages": [{"role", "content"}, ...]}` per
JSONL line, or a parquet file with a `messages` column), renders them with the model's own chat template, and
writes the trained model + tokenizer to `--output` (atomically: a temp folder renamed at the end) with a per-step
log `sft_log.jsonl`. Until then it works in `<output>.partial/`, checkpointing every --save-steps steps, so the same
command rerun after a kill resumes where the last checkpoint left it (opd.sft.resume). For large multi-GPU runs the
paper's LlamaFactory recipe (`opd data export-llamafactory`) remains the reference; this path is for small models,
CPU runs and the embedded demo.

    opd sft --model runs/student_init --data rollouts.jsonl --output runs/student_sft --lr 1e-5 --epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from opd.data.io import iter_records
from opd.data.schema import DataError
from opd.errors import UsageError, check_writable, command, usage_errors
from opd.models import load_policy, model_source, normalize_dtype, resolve_device
from opd.sft.trainer import SFTConfig


def read_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """Load `messages` lists from JSONL, JSON or parquet, validating every record (errors name file, row, column)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    out = []
    for row, rec in enumerate(iter_records(path, columns=["messages"])):
        if "messages" not in rec:
            raise DataError(
                "no 'messages' column/key (expected ShareGPT records as `opd rollout` writes them)",
                file=path,
                row=row,
                column="messages",
            )
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError("expected a non-empty list of chat messages", file=path, row=row, column="messages")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(
                    f"every message needs string 'role' and 'content'; got {m!r}", file=path, row=row, column="messages"
                )
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError("no assistant message to train on", file=path, row=row, column="messages")
        first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
        if msgs[first]["role"] != "user":  # chat templates index the user turn before the first answer
            raise DataError(
                f"turn {first} is a {msgs[first]['role']!r} message; a conversation starts with a user turn "
                "(after optional system messages)",
                file=path,
                row=row,
                column="messages",
            )
        out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not out:
        raise DataError("no records", file=path)
    return out


def build_parser() -> argparse.ArgumentParser:
    d = SFTConfig()
    p = argparse.ArgumentParser(
        prog="opd sft",
        description="Supervised fine-tuning on chat data; the loss covers assistant tokens only (prompt tokens and "
        "other roles get label -100). Writes model, tokenizer and sft_log.jsonl to --output. Nothing is downloaded: "
        "--model is a local folder or a model id already in the Hugging Face cache.",
    )
    p.add_argument("--model", required=True, help="model folder (from_pretrained), with its tokenizer")
    p.add_argument(
        "--data", required=True, help="JSONL with one {'messages': [...]} per line, or parquet with a 'messages' column"
    )
    p.add_argument("--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument(
        "--epochs", type=float, default=d.epochs, help=f"passes over the data when --steps is 0 (default {d.epochs:g})"
    )
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (overrides --epochs when > 0)")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"sequences per optimiser step (default {d.batch_size})"
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=d.micro_batch_size,
        help="sequences per forward pass (gradient accumulation); 0 = batch size",
    )
    p.add_argument(
        "--warmup-ratio",
        type=float,
        default=d.warmup_ratio,
        help=f"linear warmup fraction, then cosine (default {d.warmup_ratio})",
    )
    p.add_argument(
        "--min-lr-ratio", type=float, default=d.min_lr_ratio, help=f"final lr / peak lr (default {d.min_lr_ratio})"
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max grad norm; 0 = no clipping")
    p.add_argument(
        "--max-length",
        type=int,
        default=d.max_length,
        help=f"drop (and count) longer conversations (default {d.max_length}, the paper's cutoff)",
    )
    p.add_argument(
        "--chat-template-kwargs",
        default="{}",
        help="JSON passed to the chat template, e.g. '{\"enable_thinking\": true}'",
    )
    p.add_argument(
        "--dtype",
        default="fp32",
        help="master weight dtype: fp32 (default), bf16, fp16, auto (bf16 on "
        "GPU, fp32 on CPU); float32, bfloat16, float16 are accepted too",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (cuda when available)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument(
        "--save-steps",
        type=int,
        default=100,
        help="checkpoint every N steps into OUTPUT.partial/, so a killed run resumes (default 100; 0: never)",
    )
    p.add_argument("--keep-last-n", type=int, default=2, help="checkpoints kept in OUTPUT.partial/ (default 2; 0: all)")
    p.add_argument(
        "--resume",
        default="auto",
        help="auto (default): continue from the newest intact checkpoint in OUTPUT.partial/; off: discard it and "
        "start over; or a checkpoint folder",
    )
    return p


@command("opd sft")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        template_kwargs = json.loads(args.chat_template_kwargs)
    except ValueError:
        template_kwargs = None
    if not isinstance(template_kwargs, dict):
        raise UsageError(f"--chat-template-kwargs must be a JSON object; got {args.chat_template_kwargs!r}")
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--output {out} already exists (pass --overwrite to replace it)")
    with usage_errors():
        config = SFTConfig(
            lr=args.lr,
            steps=args.steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size,
            warmup_ratio=args.warmup_ratio,
            min_lr_ratio=args.min_lr_ratio,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            max_length=args.max_length,
            seed=args.seed,
            log_every=args.log_every,
        )
        dtype = normalize_dtype(args.dtype)
        device = resolve_device(args.device)
    conversations = read_conversations(args.data)
    model_path = model_source(args.model, "--model")  # a checkpoint folder is read from its model/
    check_writable(out, "--output")  # before the model loads and trains, not after

    import torch

    from opd.sft.trainer import encode_dataset, train_sft

    torch.manual_seed(args.seed)
    policy = load_policy(model_path, dtype=dtype, device=device, trainable=True)
    model, tokenizer = policy.model, policy.tokenizer
    if tokenizer.pad_token_id is None:  # the saved tokenizer then pads as training did
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(policy.pad_id)
    try:
        data = encode_dataset(tokenizer, conversations, config.max_length, progress=True, **template_kwargs)
    except ValueError as exc:  # "conversation 3: ...", "no conversation fits max_length=5": say which file
        raise DataError(str(exc), file=args.data) from None
    print(
        f"opd sft: {len(data.input_ids)} conversations ({data.n_dropped_too_long} dropped: longer than "
        f"--max-length {config.max_length})"
    )

    from opd.sft.resume import SFTRun, data_fingerprint

    settings = {
        **dataclasses.asdict(config),
        "model": str(args.model),
        "data_sha256": data_fingerprint(data.input_ids, data.labels),
        "dtype": dtype,
        "device": str(device),
    }
    run = SFTRun(out, tokenizer, settings, save_steps=args.save_steps, keep_last_n=args.keep_last_n, resume=args.resume)
    run.prepare()
    try:
        logs = train_sft(model, data, config, pad_token_id=policy.pad_id, run=run)
        run.finish(model)  # the output whole, then OUTPUT.partial/ goes
    finally:
        run.close()
    logs = [json.loads(line) for line in (out / "sft_log.jsonl").read_text().splitlines() if line.strip()] or logs
    first, last = logs[0], logs[-1]
    print(
        f"opd sft: loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']}); "
        f"saved to {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
