"""ENGINE=verl: verl's own ``main_ppo`` command, built from the launchers' variables.

    ENGINE=verl bash on_policy_distillation.sh [hydra.key=value ...]     # OPD: the `opd` trainer mode
    ENGINE=verl bash grpo.sh                                            # GRPO: verl's own sync trainer
    python -m opd.engines.verl.launch --print-command                   # show the command and its environment

Why through the local engine's config: the knobs, their one default each, the presets and the validation are the
same table (`opd.engines.local.config.load_config`); this module only maps the resolved `TrainConfig` to verl's
Hydra keys (`verl_overrides`, the one place that mapping lives) and adds what only a cluster has: NNODES,
N_GPUS_PER_NODE (the actor's GPUs per node), TEACHER_N_GPUS (the teacher pool's GPUs per node), ROLLOUT_BACKEND
(vllm | sglang on GPUs, opd_hf on CPU) and RAY_ADDRESS (join a running cluster; unset: main_ppo starts one).
Extra arguments are Hydra overrides, appended last, so they win. On a machine without CUDA the run uses the
plugin's CPU platform and rollout (tiny models: the tests), with Ray bound to 127.0.0.1.

The run folder is the local engine's: OUTPUT_DIR/RUN_NAME holds config.yaml, metrics.jsonl (verl's file logger,
one line per step; `opd report RUN_DIR` reads it) and checkpoints/.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from opd.core import OPDConfig

R = "actor_rollout_ref"
ROLLOUT_BACKENDS = ("vllm", "sglang", "opd_hf")
# OPDConfig fields the trainer mode takes from verl's own keys instead of +opd.* (the sampling temperature)
FROM_VERL = ("temperature",)


class LaunchError(ValueError):
    """A setting ENGINE=verl cannot honour; the message is one line naming it."""


@dataclass(frozen=True)
class Machine:
    nnodes: int
    n_gpus_per_node: int  # the actor's (and colocated rollout's) GPUs per node
    teacher_n_gpus: int  # the teacher pool's GPUs per node (OPD only)
    rollout: str
    cpu: bool  # no CUDA: the plugin's CPU platform, logical GPUs, Ray on the loopback


def _int_var(environ, name: str, default: int, minimum: int) -> int:
    text = environ.get(name, "")
    if text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not valid; expected an integer >= {minimum}") from None
    if value < minimum:
        raise LaunchError(f"{name}={text!r} is not valid; expected an integer >= {minimum}")
    return value


def machine_from_env(environ, *, with_teacher: bool, cuda_devices: int | None = None) -> Machine:
    """The cluster knobs; defaults: one node, every visible GPU (minus the teacher's) for the actor."""
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cpu = cuda_devices == 0
    teacher = _int_var(environ, "TEACHER_N_GPUS", 1, 1) if with_teacher else 0
    actor_default = 1 if cpu else max(1, cuda_devices - teacher)
    backend = environ.get("ROLLOUT_BACKEND", "") or ("opd_hf" if cpu else "vllm")
    if backend not in ROLLOUT_BACKENDS:
        raise LaunchError(f"ROLLOUT_BACKEND={backend!r} is not valid; expected {' | '.join(ROLLOUT_BACKENDS)}")
    if cpu and backend != "opd_hf":
        raise LaunchError(f"ROLLOUT_BACKEND={backend} needs CUDA GPUs and none is visible; on CPU use opd_hf")
    return Machine(
        nnodes=_int_var(environ, "NNODES", 1, 1),
        n_gpus_per_node=_int_var(environ, "N_GPUS_PER_NODE", actor_default, 1),
        teacher_n_gpus=teacher,
        rollout=backend,
        cpu=cpu,
    )


def _v(value) -> str:
    """A Hydra override value: lists as [a,b], booleans as true/false, text quoted when it holds Hydra syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_v(v) for v in value) + "]"
    if value is None:
        return "null"
    text = str(value)
    return text if re.fullmatch(r"[\w./:+@-]*", text) else "'" + text.replace("'", "\\'") + "'"


def run_dir_of(cfg) -> Path:
    from opd.engines.local.config import run_name_from

    return Path(cfg.output_dir) / (cfg.run_name or run_name_from(cfg))


def refusals(cfg) -> None:
    """What verl cannot honour, refused in one line (never silently dropped)."""
    a = cfg.algo
    if not cfg.actor_model_path:
        raise LaunchError("ACTOR_MODEL_PATH is not set: verl needs the student as a Hugging Face model folder")
    if a.needs_teacher and not cfg.reward_model_path:
        raise LaunchError(f"REWARD_MODEL_PATH is not set: ADV_ESTIMATOR={a.adv_estimator} distils from a teacher")
    if cfg.repetition_penalty != 1:
        raise LaunchError(
            f"REPETITION_PENALTY={cfg.repetition_penalty}: verl's rollout has no repetition penalty; "
            f"set it to 1 with ENGINE=verl"
        )
    if not a.needs_teacher:
        if a.policy_loss != "ppo":
            raise LaunchError(
                f"POLICY_LOSS={a.policy_loss}: GRPO on verl uses verl's own PPO loss; set POLICY_LOSS=ppo"
            )
        if a.enable_format_reward:
            raise LaunchError(
                "ENABLE_FORMAT_REWARD=True is applied by the OPD trainer mode only; GRPO on verl "
                "scores responses with the rule reward alone"
            )
    if cfg.micro_batch_tokens < cfg.max_prompt_length + cfg.max_resp_length:
        raise LaunchError(
            f"MICRO_BATCH_TOKENS={cfg.micro_batch_tokens} is below MAX_PROMPT_LENGTH + MAX_RESP_LENGTH "
            f"({cfg.max_prompt_length + cfg.max_resp_length}): verl's dynamic batches hold whole "
            f"sequences"
        )


def verl_overrides(cfg, machine: Machine) -> list[str]:
    """Every launcher knob as verl's Hydra key (the table in docs/verl.md)."""
    refusals(cfg)
    a = cfg.algo
    run_dir = run_dir_of(cfg)
    out = [
        f"data.train_files={_v(cfg.train_dataset)}",
        f"data.val_files={_v(list(cfg.test_files))}",
        f"data.train_batch_size={cfg.mini_batch_size}",
        f"data.max_prompt_length={cfg.max_prompt_length}",
        "data.filter_overlong_prompts=true",
        f"data.max_response_length={cfg.max_resp_length}",
        f"data.seed={cfg.seed}",
        f"{R}.model.path={_v(cfg.actor_model_path)}",
        f"{R}.model.enable_gradient_checkpointing={_v(cfg.gradient_checkpointing)}",
        f"{R}.actor.ppo_mini_batch_size={cfg.mini_batch_size}",
        f"{R}.actor.ppo_epochs=1",
        f"{R}.actor.use_dynamic_bsz=true",
        f"{R}.actor.ppo_max_token_len_per_gpu={cfg.micro_batch_tokens}",
        f"{R}.rollout.log_prob_max_token_len_per_gpu={cfg.micro_batch_tokens}",
        f"{R}.actor.optim.lr={cfg.lr}",
        f"{R}.actor.optim.lr_scheduler_type={cfg.lr_scheduler}",
        f"{R}.actor.optim.lr_warmup_steps_ratio={cfg.warmup_ratio if cfg.lr_scheduler == 'cosine' else 0.0}",
        f"{R}.actor.optim.weight_decay={cfg.weight_decay}",
        f"{R}.actor.optim.betas={_v([cfg.adam_beta1, cfg.adam_beta2])}",
        f"{R}.actor.optim.clip_grad={cfg.grad_clip}",
        f"{R}.rollout.name={machine.rollout}",
        f"{R}.rollout.n={cfg.n_responses}",
        f"{R}.rollout.temperature={a.temperature}",
        f"{R}.rollout.top_p={cfg.top_p}",
        f"{R}.rollout.seed={cfg.seed}",
        f"{R}.rollout.val_kwargs.n={cfg.val_n}",
        f"{R}.rollout.val_kwargs.temperature={cfg.val_temperature}",
        f"{R}.rollout.val_kwargs.top_p={cfg.val_top_p}",
        f"{R}.rollout.val_kwargs.do_sample=true",
        "reward.custom_reward_function.path=pkg://opd.grading.reward",
        "reward.custom_reward_function.name=compute_score",
        "algorithm.adv_estimator=grpo",  # no critic; in the OPD mode the advantages come from opd.adv_estimator
        "algorithm.use_kl_in_reward=false",
        f"algorithm.norm_adv_by_std_in_grpo={_v(a.norm_adv_by_std)}",
        f"{R}.actor.loss_agg_mode={a.loss_agg_mode}",
        f"{R}.actor.clip_ratio_low={a.clip_ratio_low}",
        f"{R}.actor.clip_ratio_high={a.clip_ratio_high}",
        f"{R}.actor.clip_ratio_c={a.clip_ratio_c}",
        f"trainer.nnodes={machine.nnodes}",
        f"trainer.n_gpus_per_node={machine.n_gpus_per_node}",
        f"trainer.total_epochs={cfg.total_epochs}",
        f"trainer.test_freq={cfg.test_freq if cfg.test_freq > 0 else -1}",
        f"trainer.save_freq={cfg.save_freq if cfg.save_freq > 0 else -1}",
        f"trainer.val_before_train={_v(cfg.val_before_train)}",
        "trainer.logger=[console,file]",
        "trainer.project_name=opd",
        f"trainer.experiment_name={_v(run_dir.name)}",
        f"trainer.default_local_dir={_v(str(run_dir / 'checkpoints'))}",
    ]
    if cfg.total_steps is not None:
        out.append(f"trainer.total_training_steps={cfg.total_steps}")
    if cfg.keep_last_n > 0:  # KEEP_LAST_N: verl rotates its own checkpoints
        out.append(f"trainer.max_actor_ckpt_to_keep={cfg.keep_last_n}")
    if cfg.resume in ("auto", "off"):
        out.append(f"trainer.resume_mode={'auto' if cfg.resume == 'auto' else 'disable'}")
    else:
        out += ["trainer.resume_mode=resume_path", f"trainer.resume_from_path={_v(cfg.resume)}"]
    if cfg.enable_thinking is not None:
        out.append(f"+data.apply_chat_template_kwargs.enable_thinking={_v(cfg.enable_thinking)}")
    if cfg.model_dtype in ("bf16", "auto") and not machine.cpu:
        out.append(f"{R}.rollout.dtype=bfloat16")
    else:
        out += [
            f"{R}.rollout.dtype={'float16' if cfg.model_dtype == 'fp16' else 'float32'}",
            f"+{R}.actor.fsdp_config.mixed_precision={{param_dtype:{_short_dtype(cfg.model_dtype)},"
            f"reduce_dtype:fp32,buffer_dtype:fp32}}",
        ]
    if a.needs_teacher:
        out += ["trainer.v1.trainer_mode=opd", f"{R}.actor.use_kl_loss=false"]
        out += [f"+opd.{f.name}={_v(getattr(a, f.name))}" for f in fields(OPDConfig) if f.name not in FROM_VERL]
        out += [
            f"+opd.teacher.path={_v(cfg.reward_model_path)}",
            f"+opd.teacher.n_gpus_per_node={machine.teacher_n_gpus}",
            f"+opd.teacher.nnodes={machine.nnodes}",
            f"+opd.teacher.max_token_len_per_gpu={cfg.micro_batch_tokens}",
        ]
        if cfg.teacher_dtype is not None:
            out.append(f"+opd.teacher.model_dtype={cfg.teacher_dtype}")
    else:
        out.append(f"{R}.actor.use_kl_loss={_v(a.use_kl)}")
        if a.use_kl:
            out += [f"{R}.actor.kl_loss_coef={a.kl_coef}", f"{R}.actor.kl_loss_type={a.kl_loss_type}"]
    if machine.cpu:
        out += cpu_overrides(machine)
    return out


def _short_dtype(name: str) -> str:
    return {"bf16": "bf16", "fp16": "fp16"}.get(name, "fp32")


def cpu_overrides(machine: Machine) -> list[str]:
    """The CPU platform's run: sdpa attention (verl defaults to flash-attn), padded rows, one worker each, Ray with
    logical GPUs on the loopback only."""
    return [
        "trainer.device=cpu",
        f"+{R}.model.override_config.attn_implementation=sdpa",
        f"{R}.model.use_remove_padding=false",
        f"{R}.actor.strategy=fsdp2",
        f"{R}.ref.strategy=fsdp2",
        f"{R}.rollout.tensor_model_parallel_size=1",
        f"{R}.rollout.agent.num_workers=1",
        "reward.num_workers=1",
        "data.dataloader_num_workers=0",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "ray_kwargs.ray_init.num_cpus=8",
        f"+ray_kwargs.ray_init.num_gpus={machine.n_gpus_per_node + machine.teacher_n_gpus}",
        "+ray_kwargs.ray_init.address=local",
        "+ray_kwargs.ray_init._node_ip_address=127.0.0.1",
        "+ray_kwargs.ray_init.include_dashboard=false",
    ]


def verl_environment(cfg, machine: Machine) -> dict[str, str]:
    """Variables every Ray process must see (set before Ray starts, so its workers inherit them)."""
    env = {
        "OPD_VERL": "1",
        "VERL_FILE_LOGGER_PATH": str(run_dir_of(cfg) / "metrics.jsonl"),
        "TOKENIZERS_PARALLELISM": "false",
        "HYDRA_FULL_ERROR": "1",
    }
    if machine.cpu:
        env.update(
            VERL_PLATFORM="cpu",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            GLOO_SOCKET_IFNAME="lo",
            RAY_USAGE_STATS_ENABLED="0",
        )
    return env


def build(environ, preset: str | None, extra: list[str], cuda_devices: int | None = None):
    """(TrainConfig, the main_ppo argv, the environment additions) for these launcher variables."""
    from opd.engines.local.config import load_config, sampling_bias_warnings

    cfg = load_config(preset, None, environ, {})
    machine = machine_from_env(environ, with_teacher=cfg.algo.needs_teacher, cuda_devices=cuda_devices)
    for warning in sampling_bias_warnings(cfg):
        print(f"opd verl: warning: {warning}", file=sys.stderr)
    argv = [sys.executable, "-m", "verl.trainer.main_ppo", *verl_overrides(cfg, machine), *extra]
    return cfg, argv, verl_environment(cfg, machine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opd.engines.verl.launch",
        description="Run OPD or GRPO on verl's own trainer from the launcher variables.",
    )
    parser.add_argument("--preset", help="named recipe (opd.presets), as the launchers pass PRESET")
    parser.add_argument("--print-command", action="store_true", help="print the environment and command, run nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides for verl, applied last")
    args = parser.parse_args(argv)
    try:
        cfg, command, env = build(os.environ, args.preset, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"opd verl: {exc}", file=sys.stderr)
        return 2
    if args.print_command:
        print(" ".join(f"{k}={v}" for k, v in env.items()) + " \\")
        print(" \\\n  ".join(command))
        return 0
    from opd.engines.local.config import config_yaml
    from opd.io import atomic_write_text

    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_yaml(cfg))
    os.environ.update(env)
    sys.stdout.flush()
    os.execv(command[0], command)
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
