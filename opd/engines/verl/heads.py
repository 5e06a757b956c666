"""The teacher's output head on the student's side, for the full vocabulary (``opd.top_k=-1``).

The full-vocabulary update needs the teacher's whole distribution at every response position where the student's
logits are (the actor's logits hook), but the teacher runs in its own worker group. What crosses over is its final
hidden states ([R, H] per sequence, `capture_output_layer` takes them in the teacher's process) and, once per
actor process, its output embedding [V, H] read from the teacher's checkpoint (`output_embedding`, only that
tensor is read). `opd.core.full_vocab_teacher_head` rebuilds the teacher's logits from the two, a chunk at a time.
"""

from __future__ import annotations

import json
import os

import torch

_CAPTURED: dict[str, torch.Tensor] = {}  # the output layer's last input and output, in the teacher's process
_HEADS: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}  # per actor process: (path, width, device)


class HeadError(ValueError):
    """The teacher's output layer cannot be used for the full vocabulary; one line naming the setting."""


def capture_output_layer(model) -> None:
    """Keep the input (final hidden states) and output (logits) of `model`'s output layer at every forward."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise HeadError(
            f"opd.top_k=-1 needs the teacher's output layer as a linear layer; {type(model).__name__} has "
            f"{type(head).__name__}: use a top-k support (opd.top_k=K)"
        )

    def keep(module, args, output):
        _CAPTURED["hidden"] = args[0].detach()
        _CAPTURED["logits"] = output.detach()

    head.register_forward_hook(keep)


def _unpad(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The output layer's [1, L, ...] packed rows, or [B, S, ...] right-padded rows (verl without
    use_remove_padding), as the [L, ...] rows the logits hook sees."""
    lengths = lengths.tolist()
    if x.shape[0] == 1 and x.shape[1] == sum(lengths):
        return x[0]
    if x.shape[0] == len(lengths) and x.shape[1] >= max(lengths, default=0):
        return torch.cat([x[i, :n] for i, n in enumerate(lengths)])
    raise HeadError(
        f"the teacher's output layer saw {tuple(x.shape[:2])} rows for sequences of lengths {lengths} "
        "(sequence parallelism or padded lengths are not supported with opd.top_k=-1)"
    )


def captured_hidden(logits: torch.Tensor, temperature: float, lengths: torch.Tensor) -> torch.Tensor:
    """The final hidden states [L, H] of the forward that produced `logits` ([1, L, V'] divided by `temperature`;
    `lengths`: the sequences' lengths), after checking that those logits are the output layer's (no soft-cap or
    scaling after it)."""
    if "hidden" not in _CAPTURED:
        raise HeadError("the teacher's final hidden states were not captured (capture_output_layer not installed)")
    hidden = _unpad(_CAPTURED.pop("hidden"), lengths)
    raw = _unpad(_CAPTURED.pop("logits"), lengths)
    want = logits[0, :4].float()
    got = raw[:4, : logits.shape[-1]].float() / temperature
    if (want - got).abs().max() > 1e-3 * float(want.abs().max().clamp(min=1.0)):
        raise HeadError(
            "the teacher's logits are not its output layer applied to its final hidden states (a soft-cap or a "
            "logit scale?): opd.top_k=-1 on verl rebuilds them from the hidden states; use a top-k support"
        )
    return hidden


def find_output_embedding(path: str) -> dict[str, tuple[str, str]]:
    """{"weight": (safetensors file, key)[, "bias": (file, key)]} of the output layer in the checkpoint at `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise HeadError(f"opd.top_k=-1: the teacher at {path} has no linear output layer; use a top-k support")
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = json.load(f)["weight_map"]
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        from safetensors import safe_open

        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            files = {key: "model.safetensors" for key in f.keys()}
    else:
        raise HeadError(f"opd.top_k=-1 reads the teacher's output embedding from safetensors; none in {path}")
    for name in names:
        if name in files:
            out = {"weight": (os.path.join(path, files[name]), name)}
            if head.bias is not None:
                bias = name.removesuffix("weight") + "bias"
                if bias not in files:
                    raise HeadError(f"opd.top_k=-1: the teacher's output bias {bias!r} is not in {path}")
                out["bias"] = (os.path.join(path, files[bias]), bias)
            return out
    raise HeadError(f"opd.top_k=-1: none of {names} (the teacher's output embedding) is in the checkpoint at {path}")


def output_embedding(path: str, vocab_width: int | None, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's output embedding (weight [V, H], bias [V] or None) cut to the shared vocabulary, on `device`;
    read once per process."""
    key = (path, vocab_width, str(device))
    if key not in _HEADS:
        from safetensors import safe_open

        rows = slice(None) if vocab_width is None else slice(0, vocab_width)
        tensors = {}
        for name, (file, tensor_key) in find_output_embedding(path).items():
            with safe_open(file, "pt") as f:
                tensors[name] = f.get_slice(tensor_key)[rows].contiguous().to(device)
        _HEADS[key] = (tensors["weight"], tensors.get("bias"))
    return _HEADS[key]
