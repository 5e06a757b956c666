"""The OPD trainer mode's settings, read from verl's Hydra config (the ``opd`` group) and checked before any worker.

Why one ``opd`` group: verl accepts new top-level keys with ``+``, so every OPD knob is ``+opd.<OPDConfig field>``
(``+opd.top_k=16 +opd.top_k_strategy=only_stu``; the names and validation are `OPDConfig`'s, so a bad value fails
with its one-line message) and the teacher is ``+opd.teacher.<key>`` (`TEACHER_KEYS`). Knobs verl already owns are
taken from verl, never duplicated: the sampling temperature is ``actor_rollout_ref.rollout.temperature`` and the
``seq-mean-token-sum-norm`` length is ``data.max_response_length``. What this slice cannot run fails here, with the
setting that causes it named, instead of deep inside a worker.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from opd.core import OPDConfig
from opd.core.step import reads_width
from opd.engines.verl.registration import TRAINER_MODE

__all__ = ["TRAINER_MODE", "OPDSettings", "SettingsError", "TeacherSettings", "read_settings"]

# +opd.teacher.<key>: default, and what it is
TEACHER_KEYS = {
    "path": (None, "teacher model folder (REWARD_MODEL_PATH); same tokenizer as the student"),
    "n_gpus_per_node": (1, "GPUs of the teacher's own resource pool, per node (TEACHER_N_GPUS)"),
    "nnodes": (1, "nodes of the teacher's resource pool"),
    "param_offload": (False, "keep the teacher's parameters on the CPU between its forwards"),
    "model_dtype": (None, "dtype the teacher's weights are held in (default: the actor's fsdp_config.model_dtype)"),
    "micro_batch_size_per_gpu": (None, "sequences per teacher forward (default: the actor's log-prob micro-batch)"),
    "max_token_len_per_gpu": (None, "tokens per teacher forward with use_dynamic_bsz (default: the actor's)"),
}


class SettingsError(ValueError):
    """A setting this trainer mode cannot run with; the message is one line naming it."""


@dataclass(frozen=True)
class TeacherSettings:
    path: str | None
    n_gpus_per_node: int
    nnodes: int
    param_offload: bool
    model_dtype: str | None
    micro_batch_size_per_gpu: int | None
    max_token_len_per_gpu: int | None


@dataclass(frozen=True)
class OPDSettings:
    algo: OPDConfig
    teacher: TeacherSettings
    norm_length: int  # data.max_response_length: the seq-mean-token-sum-norm divisor, as the local engine's
    vocab_width: int | None = None  # logit width both models are read at (None: the full width); set at setup

    @property
    def reads_k(self) -> int:
        """How many top-k slots the read passes write (K, or the diagnostics' width for K = 0)."""
        return reads_width(self.algo, self.vocab_width or 1 << 30)

    def hook_algo(self) -> OPDConfig:
        """The algorithm config the logits hooks use: verl already divided the logits by the pass's temperature."""
        return replace(self.algo, temperature=1.0, teacher_temperature=1.0)


def _plain(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def read_settings(config) -> OPDSettings:
    """Build and check the settings from verl's full config (a DictConfig); raises SettingsError."""
    raw = _plain(config.get("opd"))
    teacher_raw = raw.pop("teacher", None) or {}
    if not isinstance(teacher_raw, dict):
        raise SettingsError(f"opd.teacher must be a group of keys ({', '.join(TEACHER_KEYS)}); got {teacher_raw!r}")
    unknown = sorted(set(teacher_raw) - set(TEACHER_KEYS))
    if unknown:
        raise SettingsError(f"unknown opd.teacher key(s) {unknown}; valid: {', '.join(TEACHER_KEYS)}")
    teacher = TeacherSettings(**{k: teacher_raw.get(k, default) for k, (default, _) in TEACHER_KEYS.items()})

    rollout_temperature = float(config.actor_rollout_ref.rollout.temperature)
    if "temperature" in raw and float(raw["temperature"]) != rollout_temperature:
        raise SettingsError(
            f"opd.temperature={raw['temperature']} differs from actor_rollout_ref.rollout.temperature="
            f"{rollout_temperature}: the student is scored at its sampling temperature; set only the "
            f"rollout's"
        )
    raw["temperature"] = rollout_temperature
    for f in fields(OPDConfig):  # Hydra hands over ints for floats written without a dot ("1"): accept them
        if f.type == "float" and isinstance(raw.get(f.name), int) and not isinstance(raw.get(f.name), bool):
            raw[f.name] = float(raw[f.name])
    try:
        algo = OPDConfig.from_dict(raw)
    except ValueError as exc:  # the core's one-line message, with the Hydra spelling of the key
        raise SettingsError(str(exc).replace("OPDConfig.", "opd.")) from None
    settings = OPDSettings(algo=algo, teacher=teacher, norm_length=int(config.data.max_response_length))
    check_supported(settings, config)
    return settings


def check_supported(settings: OPDSettings, config) -> None:
    """The combinations this slice refuses, each with the one setting to change."""
    algo, teacher = settings.algo, settings.teacher
    if algo.use_kl and not algo.needs_teacher:
        raise SettingsError(
            f"opd.use_kl=True with opd.adv_estimator={algo.adv_estimator!r}: the OPD trainer mode holds the "
            "reference in the teacher's workers; without a teacher use verl's own trainer (actor.use_kl_loss)"
        )
    if algo.needs_teacher and not teacher.path:
        raise SettingsError(f"opd.adv_estimator={algo.adv_estimator!r} needs a teacher: set +opd.teacher.path=DIR")
    for name in ("n_gpus_per_node", "nnodes"):
        value = getattr(teacher, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SettingsError(f"opd.teacher.{name}={value!r} is not valid; expected an int >= 1")
    refusals = [
        (
            config.algorithm.get("use_kl_in_reward", False),
            "algorithm.use_kl_in_reward=True",
            "the OPD trainer mode computes its own rewards",
        ),
        (
            config.actor_rollout_ref.actor.get("use_kl_loss", False),
            "actor_rollout_ref.actor.use_kl_loss=True",
            "the OPD loss replaces verl's; use opd.use_kl (the core's KL-to-reference term)",
        ),
        (
            config.algorithm.adv_estimator == "gae" or config.critic.get("enable"),
            "a critic (algorithm.adv_estimator="
            f"{config.algorithm.adv_estimator}, critic.enable={config.critic.get('enable')})",
            "OPD has no value model; set algorithm.adv_estimator=grpo (verl's estimator only decides whether a critic "
            "is built; the OPD advantages come from opd.adv_estimator)",
        ),
        (
            (config.get("distillation") or {}).get("enabled", False),
            "distillation.enabled=True",
            "verl's built-in distillation and the OPD trainer mode are alternatives; pick one",
        ),
        (
            int(config.actor_rollout_ref.actor.get("ulysses_sequence_parallel_size", 1) or 1) > 1,
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size > 1",
            "the logits hooks see whole packed sequences only",
        ),
        (
            bool(config.actor_rollout_ref.model.get("use_fused_kernels", False)),
            "actor_rollout_ref.model.use_fused_kernels=True",
            "fused kernels never materialise the logits the hooks read",
        ),
    ]
    for refused, setting, why in refusals:
        if refused:
            raise SettingsError(f"{setting} is not supported by the OPD trainer mode: {why}")
