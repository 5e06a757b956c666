"""Moves between verl's layouts and the core's [N, T, K]: no arithmetic on values, only indexing and padding.

verl keeps a micro-batch as packed rows (every sequence's prompt + response tokens back to back, no padding) and
stores per-sequence fields in TransferQueue as nested (jagged) tensors. Two facts fix the alignment:
- in the packed rows, row r holds the logits predicting token r + 1, so response token t of sequence i (prompt
  length P_i, response length R_i, sequence start s_i) is predicted by row s_i + P_i - 1 + t;
- a logits hook must return one value per packed row, shape (L,), so a K-wide read travels as K keys
  ``{name}_0 .. {name}_{K-1}`` (`split_slots` / `join_slots`), while the trainer's own fields keep the K dimension
  in one nested tensor [n, R_i, K] (`to_nested` / `from_nested`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedLayout:
    """Where each sequence's response sits in the packed rows of a micro-batch (or a whole batch)."""

    seq_offsets: torch.Tensor  # [n + 1] long: start of sequence i in the packed rows (prompt + response)
    response_lengths: torch.Tensor  # [n] long

    @classmethod
    def from_nested(cls, input_ids: torch.Tensor, responses: torch.Tensor) -> "PackedLayout":
        """From verl's nested ``input_ids`` (prompt + response) and ``responses`` (or any response-long field)."""
        return cls(input_ids.offsets().long().cpu(), responses.offsets().diff().long().cpu())

    @property
    def n_rows(self) -> int:
        return int(self.seq_offsets[-1])

    @property
    def width(self) -> int:
        """T: the longest response (the padded width of the [n, T, ...] tensors)."""
        return int(self.response_lengths.max()) if self.response_lengths.numel() else 0

    def response_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(packed row, sequence i, position t) of every response token, in sequence-major order."""
        lengths = self.response_lengths
        if bool((self.seq_offsets.diff() <= lengths).any()):
            raise ValueError("every sequence needs a prompt of at least one token before its response")
        seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(int(lengths.sum())) - starts[seq]
        rows = self.seq_offsets[1:][seq] - lengths[seq] - 1 + pos
        return rows, seq, pos

    def response_mask(self, device=None) -> torch.Tensor:
        """[n, T] float mask of the real response positions."""
        T = self.width
        return (torch.arange(T)[None, :] < self.response_lengths[:, None]).float().to(device)


def packed_next_tokens(input_ids: torch.Tensor) -> torch.Tensor:
    """[L] the token each packed row predicts (row r -> token r + 1; a sequence's last row gets the next one's first
    token, which no response position reads)."""
    return torch.roll(input_ids.values(), shifts=-1, dims=0)


def packed_to_response(values: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """[L, ...] per packed row -> [n, T, ...] at the response positions, zero-padded (keeps the autograd graph)."""
    rows, seq, pos = layout.response_rows()
    rows, seq, pos = (x.to(values.device) for x in (rows, seq, pos))
    out = values.new_zeros((len(layout.response_lengths), layout.width, *values.shape[1:]))
    return out.index_put((seq, pos), values[rows])


def response_to_packed(resp: torch.Tensor, layout: PackedLayout, fill=0) -> torch.Tensor:
    """[n, T, ...] at the response positions -> [L, ...] per packed row (`fill` at prompt rows)."""
    rows, seq, pos = layout.response_rows()
    rows, seq, pos = (x.to(resp.device) for x in (rows, seq, pos))
    out = torch.full((layout.n_rows, *resp.shape[2:]), fill, dtype=resp.dtype, device=resp.device)
    out[rows] = resp[seq, pos]
    return out


def full_sequence_to_response(nested: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """A hook output as TransferQueue holds it (nested over prompt + response rows) -> [n, T] at the response."""
    return packed_to_response(nested.values(), layout)


def split_slots(x: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """[L, K] -> {name_j: [L]}: the shape a logits hook may return."""
    return {f"{name}_{j}": x[:, j] for j in range(x.shape[-1])}


def join_slots(source, name: str, k: int, convert=None) -> torch.Tensor:
    """{name_j} -> [..., K] (the inverse of `split_slots`); `convert` maps each value first."""
    parts = [source[f"{name}_{j}"] for j in range(k)]
    if convert is not None:
        parts = [convert(p) for p in parts]
    return torch.stack(parts, -1)


def slot_names(name: str, k: int) -> list[str]:
    return [f"{name}_{j}" for j in range(k)]


def to_nested(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[n, T, ...] -> nested [n, R_i, ...] (what the trainer writes to TransferQueue)."""
    return torch.nested.as_nested_tensor([padded[i, : int(n)] for i, n in enumerate(lengths)], layout=torch.jagged)


def from_nested(nested: torch.Tensor, width: int | None = None, fill=0) -> torch.Tensor:
    """nested [n, R_i, ...] -> [n, T, ...] zero-padded (T = `width`, or the longest)."""
    parts = nested.unbind()
    T = max((p.shape[0] for p in parts), default=0) if width is None else width
    out = torch.full((len(parts), T, *parts[0].shape[1:]), fill, dtype=parts[0].dtype, device=parts[0].device)
    for i, p in enumerate(parts):
        out[i, : p.shape[0]] = p
    return out
