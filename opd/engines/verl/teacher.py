"""The teacher as a verl worker group: verl's own `TrainingWorker` with the actor's FSDP engine, inference only, in a
resource pool of its own, scoring the student's exact ids through its logits hook (`hooks.teacher_loss`).

Why a training worker rather than a rollout server: OPD needs the teacher's log-probs at ids the *student* chose
(its sampled token and its top-k), which verl's inference servers cannot return (their prompt-logprobs protocol
gives the server's own top-k only). The engine config is the actor's, so with the teacher equal to the student the
two reads are the same computation (advantages exactly 0); the optimizer the engine builds never steps (its states
are created lazily, so it costs no memory). ``+opd.teacher.param_offload=true`` keeps the weights on the CPU
between forwards; ``+opd.teacher.model_dtype=bf16`` holds them in bf16 (the actor's default is fp32 masters).
With the full vocabulary the group also returns its final hidden states (`teacher_worker.TeacherWorker`).
"""

from __future__ import annotations

import copy
import dataclasses

from opd.engines.verl import fields as F
from opd.engines.verl.settings import OPDSettings

POOL = "opd_teacher_pool"


def pool_spec(settings: OPDSettings) -> list[int]:
    """GPUs per node of the teacher's resource pool (verl's resource_pool_spec format)."""
    return [settings.teacher.n_gpus_per_node] * settings.teacher.nnodes


def worker_config(config, settings: OPDSettings, path: str | None = None):
    """verl's TrainingWorkerConfig for the teacher (or, with `path`, another model held like it: the reference):
    the actor's model config with the teacher's path (no LoRA) and the actor's FSDP engine with the teacher's
    offload, dtype and micro-batch settings."""
    from omegaconf import open_dict
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine_workers import TrainingWorkerConfig

    teacher = settings.teacher
    model_node = copy.deepcopy(config.actor_rollout_ref.model)
    with open_dict(model_node):
        model_node.path = path or teacher.path
        model_node.tokenizer_path = None
        model_node.hf_config_path = None
        model_node.lora_rank = 0
        model_node.lora_adapter_path = None
        if "lora" in model_node:
            model_node.lora.rank = 0
    model_config = omega_conf_to_dataclass(model_node)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    rollout = config.actor_rollout_ref.rollout
    changes = dict(
        param_offload=bool(teacher.param_offload),
        use_dynamic_bsz=bool(rollout.get("log_prob_use_dynamic_bsz", False)),
        infer_micro_batch_size_per_gpu=teacher.micro_batch_size_per_gpu
        or rollout.get("log_prob_micro_batch_size_per_gpu"),
        infer_max_token_len_per_gpu=teacher.max_token_len_per_gpu or rollout.get("log_prob_max_token_len_per_gpu"),
    )
    if teacher.model_dtype is not None:
        changes["model_dtype"] = teacher.model_dtype
    engine = dataclasses.replace(actor.engine, **changes)
    return TrainingWorkerConfig(
        model_type="language_model",
        model_config=model_config,
        engine_config=engine,
        optimizer_config=actor.optim,
        checkpoint_config=actor.checkpoint,
    )


def build_group(config, settings: OPDSettings, resource_pool, loss_fn):
    """Start the teacher's workers in `resource_pool`, load the weights, install the read hook (and, for the full
    vocabulary, the capture of the final hidden states)."""
    import ray
    from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup

    from opd.engines.verl.teacher_worker import TeacherWorker

    worker = RayClassWithInitArgs(cls=ray.remote(TeacherWorker), config=worker_config(config, settings))
    group = RayWorkerGroup(
        resource_pool=resource_pool,
        ray_cls_with_init=worker,
        device_name=config.trainer.device,
        name_prefix="opd_teacher",
    )
    group.reset()
    group.set_loss_fn(loss_fn)
    if settings.algo.support == "full":
        group.capture_hidden()
    return group


def build_reference(group, config, settings: OPDSettings, loss_fn) -> None:
    """USE_KL: the reference policy (the initial student, ``actor_rollout_ref.model.path``) as a second engine in
    the teacher's workers."""
    group.init_reference(worker_config(config, settings, path=config.actor_rollout_ref.model.path), loss_fn)


def _read_flags(phase: str, temperature: float) -> dict:
    return {
        "compute_loss": True,
        "distillation_use_topk": True,
        "distillation_only": True,
        "calculate_entropy": False,
        "temperature": float(temperature),
        F.PHASE: phase,
    }


def score(group, batch, temperature: float) -> None:
    """One read pass of the teacher over `batch` (a KVBatchMeta); its fields land in TransferQueue."""
    import ray

    batch.extra_info.update(_read_flags(F.READ_TEACHER, temperature))
    output = group.infer_batch(batch)
    ray.get(output.futures)  # in TransferQueue mode the workers return metadata, not a batch to collect


def score_reference(group, batch, temperature: float, slot_info: dict) -> None:
    """USE_KL: the reference's log-probs at the update's target slots (`slot_info`: their layout) into
    TransferQueue, as the update's ``opd_tg_ref`` field."""
    import ray

    batch.extra_info.update(_read_flags(F.READ_REFERENCE, temperature), **slot_info)
    output = group.reference_batch(batch)
    ray.get(output.futures)
