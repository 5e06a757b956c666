"""The OPD trainer mode of verl (``trainer.v1.trainer_mode=opd``): verl's sync PPO trainer with OPD's step.

verl runs the step (rollout, rule reward, balancing, update, weight sync, logging, checkpoints); this class changes
three of its stages and keeps the maths in `opd.core`:
- ``_compute_old_log_prob``: verl's own old-log-prob pass also runs the actor's read hook (the student's log p at the
  sampled token, entropy and top-k; no extra forward);
- ``_compute_advantage``: the teacher worker group scores the student's ids; strategies that need it get one more
  actor pass (log p at the teacher's top-k), and so does the full vocabulary (the exact reverse KL against the
  teacher's output head, for the diagnostics); then `build_targets` on [N, T, K] (group = ``uid``, outcome =
  ``rm_scores``), the dynamics metrics (``opd/...``, the local engine's names) and the update's targets back to
  TransferQueue;
- ``_update_actor``: verl's update with the actor's logits hook computing log p at every target slot (the K
  dimension kept) and `step_loss` as the loss; with the full vocabulary the hook also computes the per-position
  surrogate against the teacher's head (its final hidden states from the teacher pass, its output embedding read
  from its checkpoint once per actor process).
The mode behaves as verl's ``sync`` wherever verl branches on the mode's name (replay buffer, data loader, configs
under ``trainer.v1.sync``). Timings of the added passes: ``timing_s/opd_teacher``, ``timing_s/opd_student_at_teacher``,
``timing_s/opd_full_kl``, ``timing_s/opd_targets``, ``timing_s/opd_reference`` (USE_KL: the reference's log-probs at
the target slots, read by a second engine in the teacher's workers once the targets exist).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1 import PPOTrainerSync, register_trainer
from verl.utils.debug import marked_timer

from opd.core.step import step_diagnostics
from opd.engines.verl import fields as F
from opd.engines.verl import teacher as teacher_group
from opd.engines.verl.hooks import HookSpec, actor_loss, teacher_loss
from opd.engines.verl.settings import TRAINER_MODE, SettingsError, read_settings
from opd.engines.verl.targets import needs_student_at_teacher, opd_targets, read_field_names, slot_info, target_fields


@contextmanager
def extra_info_on_call(worker_group, method: str, flags: dict, called: list | None = None):
    """While inside, `worker_group.<method>(batch)` first adds `flags` to the batch's extra_info (how verl's own
    stages are given the OPD phase without copying them); `called` records that it ran."""
    original = getattr(worker_group, method)

    def with_flags(batch, *args, **kwargs):
        batch.extra_info.update(flags)
        if called is not None:
            called.append(method)
        return original(batch, *args, **kwargs)

    setattr(worker_group, method, with_flags)
    try:
        yield
    finally:
        setattr(worker_group, method, original)


def all_fields(batch: KVBatchMeta) -> KVBatchMeta:
    """The same samples with every field TransferQueue holds for them (a worker receives only a meta's fields)."""
    return KVBatchMeta(
        keys=list(batch.keys),
        tags=list(batch.tags),
        partition_id=batch.partition_id,
        fields=None,
        extra_info=dict(batch.extra_info or {}),
    )


def _vocab_width(config, settings) -> int | None:
    """The logit width both models are read at, checked as the local engine does (one tokenizer, top_k fits)."""
    from transformers import AutoConfig

    from opd.models import check_vocabularies

    student = config.actor_rollout_ref.model.path
    _, width = check_vocabularies(student, settings.teacher.path if settings.algo.needs_teacher else None)
    limit = width or AutoConfig.from_pretrained(student).vocab_size
    if settings.algo.top_k > limit:
        raise SettingsError(f"opd.top_k={settings.algo.top_k} exceeds the vocabulary ({limit} tokens)")
    return width


def without_fields(batch: KVBatchMeta, names: list[str]) -> KVBatchMeta:
    """The same samples minus `names` (the read passes' per-row fields, which the update does not need to fetch)."""
    if batch.fields is None:
        return batch
    drop = set(names)
    return KVBatchMeta(
        keys=list(batch.keys),
        tags=list(batch.tags),
        partition_id=batch.partition_id,
        fields=[f for f in batch.fields if f not in drop],
        extra_info=dict(batch.extra_info or {}),
    )


def with_fields(batch: KVBatchMeta, names: tuple[str, ...] = ()) -> KVBatchMeta:
    """A copy of `batch` (its own extra_info), plus fields `names` (written to TransferQueue by a worker since)."""
    return KVBatchMeta(
        keys=list(batch.keys),
        tags=list(batch.tags),
        partition_id=batch.partition_id,
        fields=None if batch.fields is None else [*batch.fields, *names],
        extra_info=dict(batch.extra_info or {}),
    )


@register_trainer(TRAINER_MODE)
class OPDTrainer(PPOTrainerSync):
    """verl's sync trainer with OPD's reads, targets and K-dimensional update (see the module docstring)."""

    def __init__(self, config):
        settings = read_settings(config)  # fail before any worker starts
        self.settings = dataclasses.replace(settings, vocab_width=_vocab_width(config, settings))
        self.hook_spec = HookSpec(
            algo=self.settings.hook_algo(),
            reads_k=self.settings.reads_k,
            norm_length=self.settings.norm_length,
            vocab_width=self.settings.vocab_width,
            teacher_path=self.settings.teacher.path,
            teacher_temperature=self.settings.algo.teacher_temperature,
        )
        if self.settings.algo.support == "full":  # the actor reads the teacher's output embedding: is it there?
            from opd.engines.verl.heads import HeadError, find_output_embedding

            try:
                find_output_embedding(self.settings.teacher.path)
            except HeadError as exc:
                raise SettingsError(str(exc)) from None
        self.teacher_wg = None
        self._slot_info: dict = {}
        super().__init__(config)

    # verl branches on the mode's name in several places (replay buffer, refills, checkpoints): act as "sync"
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, name: str) -> None:
        self.selected_mode = name

    # ------------------------------------------------------------------ set-up
    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if self.settings.algo.needs_teacher:
            self.resource_pool_manager.resource_pool_spec[teacher_group.POOL] = teacher_group.pool_spec(self.settings)

    def _setup(self):
        super()._setup()
        self.actor_rollout_wg.set_loss_fn(partial(actor_loss, self.hook_spec))
        if self.settings.algo.needs_teacher:
            pool = self.resource_pool_manager.resource_pool_dict[teacher_group.POOL]
            self.teacher_wg = teacher_group.build_group(
                self.config, self.settings, pool, partial(teacher_loss, self.hook_spec)
            )
            if self.settings.algo.use_kl:  # the reference (the initial student) in the teacher's workers
                teacher_group.build_reference(
                    self.teacher_wg, self.config, self.settings, partial(actor_loss, self.hook_spec)
                )

    # ------------------------------------------------------------------ the step
    def _read_flags(self, phase: str, *, with_verl_outputs: bool) -> dict:
        """extra_info of an actor pass that runs an OPD hook; `with_verl_outputs` keeps verl's own log-probs."""
        flags = {
            "compute_loss": True,
            "distillation_use_topk": True,
            "distillation_only": not with_verl_outputs,
            F.PHASE: phase,
        }
        if not with_verl_outputs:
            flags.update(calculate_entropy=False, temperature=float(self.config.actor_rollout_ref.rollout.temperature))
        return flags

    def _compute_old_log_prob(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """verl's pass, with the student's read hook riding along (or on its own when verl skips the pass)."""
        called: list = []
        flags = self._read_flags(F.READ_STUDENT, with_verl_outputs=True)
        with extra_info_on_call(self.actor_rollout_wg, "compute_log_prob", flags, called):
            batch = super()._compute_old_log_prob(batch, metrics)
        if not called:  # rollout-correction bypass mode takes the rollout's log-probs and runs no actor pass
            batch = all_fields(batch)
            batch.extra_info.update(self._read_flags(F.READ_STUDENT, with_verl_outputs=False))
            self.actor_rollout_wg.compute_log_prob(batch)
        return all_fields(batch)

    def _compute_advantage(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        settings = self.settings
        if settings.algo.needs_teacher:
            with marked_timer("opd_teacher", self.timing_raw):
                teacher_group.score(self.teacher_wg, all_fields(batch), settings.algo.teacher_temperature)
            if needs_student_at_teacher(settings):
                with marked_timer("opd_student_at_teacher", self.timing_raw):
                    batch = all_fields(batch)
                    batch.extra_info.update(self._read_flags(F.READ_STUDENT_AT_TEACHER, with_verl_outputs=False))
                    self.actor_rollout_wg.compute_log_prob(batch)
            if settings.algo.support == "full":  # the exact KL for the diagnostics, against the teacher's head
                with marked_timer("opd_full_kl", self.timing_raw):
                    batch = all_fields(batch)
                    batch.extra_info.update(self._read_flags(F.READ_FULL_KL, with_verl_outputs=False))
                    self.actor_rollout_wg.compute_log_prob(batch)
        with marked_timer("opd_targets", self.timing_raw):
            names = ["uid", "input_ids", "responses", "response_mask", "rm_scores", *read_field_names(settings)]
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=names)
            uids = data["uid"]
            uids = uids.tolist() if hasattr(uids, "tolist") else list(uids)
            padding = np.array([bool(tag.get("is_padding", False)) for tag in batch.tags])
            reads, targets, response_mask = opd_targets(
                settings, data, uids=uids, has_box_N=self._has_box(data), padding=padding
            )
            metrics.update(step_diagnostics(reads, response_mask, targets))
            lengths = data["responses"].offsets().diff()
            out = target_fields(targets, reads, lengths)
            self._slot_info = slot_info(targets)
            batch = tq.kv_batch_put(
                keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(out, batch_size=len(batch.keys))
            )
        batch = without_fields(batch, read_field_names(settings))
        if settings.algo.use_kl:
            with marked_timer("opd_reference", self.timing_raw):
                temperature = float(self.config.actor_rollout_ref.rollout.temperature)
                teacher_group.score_reference(self.teacher_wg, with_fields(batch), temperature, self._slot_info)
            batch = with_fields(batch, (F.TARGET_REF_LP,))
        return batch

    def _has_box(self, data):
        """ENABLE_FORMAT_REWARD: which responses hold a \\boxed answer (decoded as the local engine does)."""
        if not self.settings.algo.enable_format_reward:
            return None
        texts = [self.tokenizer.decode(ids.tolist(), skip_special_tokens=True) for ids in data["responses"].unbind()]
        return torch.tensor(["\\boxed" in text for text in texts])

    def _update_actor(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """verl's update, with the actor's logits hook in its update phase (and the slot layout it needs)."""
        flags = {
            "distillation_use_topk": True,
            "distillation_only": True,
            "compute_loss": True,
            F.PHASE: F.UPDATE,
            **self._slot_info,
        }
        with extra_info_on_call(self.actor_rollout_wg, "update_actor", flags):
            batch = super()._update_actor(batch, metrics)
        total, count = metrics.pop(f"actor/{F.PROBE_SUM}", None), metrics.pop(f"actor/{F.PROBE_COUNT}", None)
        if total is not None and count:
            metrics[F.PROBE_METRIC] = float(total) / float(count)
        return batch
