"""The teacher's worker class: verl's `TrainingWorker` plus what the full vocabulary (``opd.top_k=-1``) and the
KL-to-reference term (``opd.use_kl``) need.

- `capture_hidden` installs a forward hook on the model's output layer, so the teacher's read hook can return its
  final hidden states next to the logits it reads (`opd.engines.verl.heads`);
- `infer_batch` is verl's, then the H per-row hidden-state keys the hook returned (a logits hook may only return
  one value per packed row) become one response-long nested field [n, R_i, H] before the output reaches
  TransferQueue: one field instead of H, and no prompt rows;
- `init_reference` builds a second engine in the same processes, the reference policy (the initial student), and
  `reference_batch` runs its read pass (log p_ref at the update's target slots, merged into one response-long
  field [n, R_i, C]). It shares the teacher's resource pool and data-parallel layout, so it needs no GPUs of its
  own; it is held like the teacher (dtype, offload, micro-batches).
Other settings use the class unchanged (no capture, no reference, nothing to merge).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.workers.engine_workers import TrainingWorker

from opd.engines.verl import fields as F
from opd.engines.verl.heads import capture_output_layer
from opd.engines.verl.tensors import PackedLayout, slot_names


def merge_rows(output: TensorDict, prefix: str, name: str, input_ids, responses) -> TensorDict:
    """Replace the per-row keys ``{prefix}_0 .. {prefix}_{J-1}`` (nested over prompt + response rows) of a read
    pass's output with one nested [n, R_i, J] field `name` at the response rows."""
    n_keys = sum(1 for key in output.keys() if key.startswith(prefix + "_"))
    if not n_keys:
        return output
    names = slot_names(prefix, n_keys)
    rows_LH = torch.stack([output[name].values() for name in names], -1)
    layout = PackedLayout.from_nested(input_ids, responses)
    rows, _, _ = layout.response_rows()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), layout.response_lengths.cumsum(0)])
    for key in names:
        del output[key]
    output[name] = torch.nested.nested_tensor_from_jagged(rows_LH[rows.to(rows_LH.device)], offsets)
    return output


def merge_hidden(output: TensorDict, input_ids, responses) -> TensorDict:
    """The teacher's H hidden-state keys -> ``opd_t_hidden`` [n, R_i, H] (see `merge_rows`)."""
    return merge_rows(output, F.TEACHER_HIDDEN_ROW, F.TEACHER_HIDDEN, input_ids, responses)


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

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_reference(self, config, loss_fn):
        self.reference = TrainingWorker(config=config)
        self.reference.reset()
        self.reference.set_loss_fn(loss_fn)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
    def reference_batch(self, data: TensorDict) -> TensorDict:
        input_ids, responses = data["input_ids"], data["responses"]
        output = self.reference.infer_batch(data)
        return output if output is None else merge_rows(output, F.REF_LP_ROW, F.TARGET_REF_LP, input_ids, responses)
