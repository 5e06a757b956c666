"""The teacher's worker class: verl's `TrainingWorker` plus what the full vocabulary needs (``opd.top_k=-1``).

- `capture_hidden` installs a forward hook on the model's output layer, so the teacher's read hook can return its
  final hidden states next to the logits it reads (`opd.engines.verl.heads`);
- `infer_batch` is verl's, then the H per-row hidden-state keys the hook returned (a logits hook may only return
  one value per packed row) become one response-long nested field [n, R_i, H] before the output reaches
  TransferQueue: one field instead of H, and no prompt rows.
Other supports use the class unchanged (no capture, nothing to merge).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.workers.engine_workers import TrainingWorker

from opd.engines.verl import fields as F
from opd.engines.verl.heads import capture_output_layer
from opd.engines.verl.tensors import PackedLayout, slot_names


def merge_hidden(output: TensorDict, input_ids, responses) -> TensorDict:
    """Replace the per-row keys ``opd_t_h_0 .. opd_t_h_{H-1}`` (nested over prompt + response rows) of a read
    pass's output with one nested [n, R_i, H] field at the response rows (``opd_t_hidden``)."""
    n_keys = sum(1 for key in output.keys() if key.startswith(F.TEACHER_HIDDEN_ROW + "_"))
    if not n_keys:
        return output
    names = slot_names(F.TEACHER_HIDDEN_ROW, n_keys)
    rows_LH = torch.stack([output[name].values() for name in names], -1)
    layout = PackedLayout.from_nested(input_ids, responses)
    rows, _, _ = layout.response_rows()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), layout.response_lengths.cumsum(0)])
    for name in names:
        del output[name]
    output[F.TEACHER_HIDDEN] = torch.nested.nested_tensor_from_jagged(rows_LH[rows.to(rows_LH.device)], offsets)
    return output


class TeacherWorker(TrainingWorker):
    """verl's training worker, inference only, able to return the teacher's final hidden states."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def capture_hidden(self):
        capture_output_layer(self.engine.module)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
    def infer_batch(self, data: TensorDict) -> TensorDict:
        input_ids, responses = data["input_ids"], data["responses"]
        output = super().infer_batch(data)  # a TensorDict here: TransferQueue is bridged by our own decorator
        return output if output is None else merge_hidden(output, input_ids, responses)
