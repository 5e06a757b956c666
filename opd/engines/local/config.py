"""TrainConfig: every knob of the local engine with its single default, plus the algorithm's OPDConfig.

Where values come from, lowest to highest precedence: the defaults below, a named preset (`opd.presets`:
`--preset NAME` or `preset: NAME` in the YAML), a YAML file (`--config x.yaml`), the launcher variables
(`--from-env`, what on_policy_distillation.sh / grpo.sh use), then `key=value` arguments; `load_config` merges them
and validates the result once. Algorithm knobs live in `opd.core.config.OPDConfig` (reached as `algo.<field>`);
this file holds no default for them. `ENV_VARS` is the one table mapping launcher variables to config keys: the
launchers, the CLI help and the tests all read it.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from opd.core.config import OPDConfig
from opd.models import DTYPES
from opd.presets import EVAL, preset

LR_SCHEDULERS = ("constant", "cosine")

# launcher variable -> config key ("algo.x" reaches OPDConfig.x). Documented in the launchers' headers.
ENV_VARS: dict[str, str] = {
    "ADV_ESTIMATOR": "algo.adv_estimator",
    "ACTOR_MODEL_PATH": "actor_model_path",
    "REWARD_MODEL_PATH": "reward_model_path",
    "N_RESPONSES": "n_responses",
    "MINI_BATCH_SIZE": "mini_batch_size",
    "MAX_PROMPT_LENGTH": "max_prompt_length",
    "MAX_RESP_LENGTH": "max_resp_length",
    "MAX_VAL_RESP_LENGTH": "max_val_resp_length",
    "LOG_PROB_TOP_K": "algo.top_k",
    "TOP_K_STRATEGY": "algo.top_k_strategy",
    "REWARD_WEIGHT_MODE": "algo.reward_weight_mode",
    "TEMPERATURE": "algo.temperature",
    "TEACHER_TEMPERATURE": "algo.teacher_temperature",
    "REPETITION_PENALTY": "repetition_penalty",
    "LR": "lr",
    "LR_SCHEDULER": "lr_scheduler",
    "USE_KL": "algo.use_kl",
    "ENABLE_FORMAT_REWARD": "algo.enable_format_reward",
    "LOSS_AGG_MODE": "algo.loss_agg_mode",
    "POLICY_LOSS": "algo.policy_loss",
    "MODEL_DTYPE": "model_dtype",
    "GRPO_OUTCOME_WEIGHT": "algo.grpo_outcome_weight",
    "TRAIN_DATASET": "train_dataset",
    "TEST_FILE": "test_files",
    "ENABLE_THINKING": "enable_thinking",
    "SAVE_FREQ": "save_freq",
    "KEEP_LAST_N": "keep_last_n",
    "TEST_FREQ": "test_freq",
    "TOTAL_EPOCHS": "total_epochs",
    "TOTAL_STEPS": "total_steps",
    "RESUME": "resume",
    "OUTPUT_DIR": "output_dir",
    "RUN_NAME": "run_name",
    "SEED": "seed",
    # added by the local engine
    "TOP_P": "top_p",
    "VAL_N": "val_n",
    "VAL_TEMPERATURE": "val_temperature",
    "VAL_TOP_P": "val_top_p",
    "VAL_BEFORE_TRAIN": "val_before_train",
    "MICRO_BATCH_TOKENS": "micro_batch_tokens",
    "ROLLOUT_BATCH_SIZE": "rollout_batch_size",
    "DEVICE": "device",
    "TEACHER_DTYPE": "teacher_dtype",
    "GRADIENT_CHECKPOINTING": "gradient_checkpointing",
}


@dataclass
class TrainConfig:
    # --- models ---
    actor_model_path: str | None = None  # student (any local HF causal LM folder)
    reward_model_path: str | None = None  # teacher (must share the student's vocabulary)
    model_dtype: str = "fp32"  # master-weight dtype: opd.models.DTYPES (auto: bf16 on CUDA, else fp32)
    teacher_dtype: str | None = None  # frozen teacher / reference dtype (None: same as model_dtype)
    gradient_checkpointing: bool = False  # recompute activations in backward (long responses on one GPU)
    device: str = "auto"  # auto = cuda when available, else cpu
    # --- data ---
    train_dataset: str = "data/dapo_math_17k.parquet"  # RL parquet (docs/workflow.md §1); `opd data prepare` writes it
    test_files: list[str] = field(
        default_factory=lambda: ["data/aime24.parquet", "data/aime25.parquet", "data/amc23.parquet"]
    )
    max_prompt_length: int = 1024  # longer prompts are dropped (count logged)
    max_resp_length: int = 7168
    max_val_resp_length: int = EVAL.max_tokens
    enable_thinking: bool | None = None  # chat-template switch (Qwen3-style); None = do not pass it
    # --- rollout ---
    n_responses: int = 4  # samples per prompt
    mini_batch_size: int = 64  # prompts per step (one optimiser step per step: on-policy)
    # rollouts sampled with top_p < 1 or a repetition penalty are scored under the plain tempered softmax: the
    # gradient is then biased (the trainer warns); 1.0 / 1.0 is unbiased OPD
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    rollout_batch_size: int = 64  # sequences per sampler call: bounds the KV cache (rows x prompt+response length)
    # torch.compile the sampler's decode step over a static KV cache (opd.generation): ~2x faster rollouts for small
    # models on CPU after a one-time compilation (seconds to a minute); samples may differ from the eager sampler's
    # in the last bits, so off by default; falls back to eager decoding where it cannot compile
    compile_sampler: bool = False
    # --- validation ---
    val_n: int = EVAL.n  # the evaluation protocol, shared with `opd eval gen`
    val_temperature: float = EVAL.temperature
    val_top_p: float = EVAL.top_p
    val_before_train: bool = True
    val_max_prompts: int | None = None  # cap per test file (None = all)
    # --- optimisation (docs/algorithm.md §5) ---
    lr: float = 1e-6
    lr_scheduler: str = "constant"  # constant | cosine (cosine with warmup_ratio linear warmup)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    micro_batch_tokens: int = 16384  # token budget (rows x padded length) of one forward/backward
    # --- schedule ---
    total_epochs: int = 1
    total_steps: int | None = None  # optional cap on optimiser steps
    save_freq: int = 20  # checkpoint every N steps (<= 0: never)
    keep_last_n: int = 0  # keep only the newest N checkpoints (0: keep all, as before); >= 2 keeps a fallback
    test_freq: int = 20  # validate every N steps (<= 0: never, except val_before_train and the last step)
    seed: int = 0
    # --- outputs ---
    output_dir: str = "runs"
    run_name: str | None = None  # None: built from the settings (see run_name_from)
    resume: str = "auto"  # auto: continue from the run's last checkpoint if any | off: start over | <checkpoint dir>
    progress: bool = True
    log_samples: int = 2  # decoded rollouts per step written to samples.jsonl (0: none)
    profile_freq: int = 0  # log per-position profiles every N steps to profiles.jsonl (0: first and last step only)
    # --- algorithm ---
    algo: OPDConfig = field(default_factory=OPDConfig)

    def __post_init__(self) -> None:
        if isinstance(self.algo, dict):
            self.algo = OPDConfig.from_dict(self.algo)
        if isinstance(self.test_files, str):
            self.test_files = split_list(self.test_files)

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is not valid; expected {expected}")

        if self.model_dtype not in DTYPES:
            raise bad("model_dtype", " | ".join(DTYPES))
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPES:
            raise bad("teacher_dtype", " | ".join(DTYPES) + " or unset")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise bad("lr_scheduler", " | ".join(LR_SCHEDULERS))
        for name in (
            "max_prompt_length",
            "max_resp_length",
            "max_val_resp_length",
            "n_responses",
            "mini_batch_size",
            "rollout_batch_size",
            "val_n",
            "micro_batch_tokens",
            "total_epochs",
        ):
            if not getattr(self, name) >= 1:
                raise bad(name, "an integer >= 1")
        if self.total_steps is not None and self.total_steps < 1:
            raise bad("total_steps", "an integer >= 1 or unset")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "a value in (0, 1]")
        if not 0 < self.val_top_p <= 1:
            raise bad("val_top_p", "a value in (0, 1]")
        if not (self.val_temperature >= 0 and math.isfinite(self.val_temperature)):
            raise bad("val_temperature", "a finite value >= 0 (0 = greedy)")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise bad("repetition_penalty", "a finite value > 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "a finite value > 0")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise bad("weight_decay", "a finite value >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "a value in [0, 1)")
        if not self.grad_clip > 0:
            raise bad("grad_clip", "> 0")
        if self.keep_last_n < 0:
            raise bad("keep_last_n", "an integer >= 0 (0: keep every checkpoint)")
        if not (self.resume in ("auto", "off") or self.resume):
            raise bad("resume", "auto | off | a checkpoint folder")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise bad("device", "auto | cpu | cuda | cuda:N | mps")
        if self.n_responses < 2 and self.algo.learns_only_from_groups:
            # the advantage is a rollout's score minus its group's mean: a group of one is always 0
            raise ValueError(
                f"OPDConfig.adv_estimator={self.algo.adv_estimator!r} compares each response with the others of its "
                f"prompt, but TrainConfig.n_responses={self.n_responses}: a group of one response has advantage 0, "
                f"so nothing would be learned; set N_RESPONSES >= 2"
            )

    # --- building ---
    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "algo"}
        out["test_files"] = list(self.test_files)
        out["algo"] = self.algo.to_dict()
        return out

    def replace(self, **changes) -> "TrainConfig":
        """A validated copy with `changes` applied (keys as in `resolve`, e.g. lr=1e-3, **{"algo.top_k": 4})."""
        return resolve(self, changes)


def sampling_bias_warnings(cfg: TrainConfig) -> list[str]:
    """Rollouts drawn from a processed distribution (top-p truncation, repetition penalty) are scored and updated
    under the plain tempered softmax: the importance ratio is taken as 1 although the sampler was another
    distribution, so the policy gradient is biased. Allowed (some recipes want it), never silent."""
    out = []
    if cfg.top_p < 1:
        out.append(
            f"TOP_P={cfg.top_p} < 1: rollouts are sampled from the top-p truncated distribution but scored "
            f"under the full tempered softmax, so the gradient is biased; use TOP_P=1 for unbiased OPD"
        )
    if cfg.repetition_penalty != 1:
        out.append(
            f"REPETITION_PENALTY={cfg.repetition_penalty} != 1: rollouts are sampled from the penalised "
            f"distribution but scored without the penalty, so the gradient is biased; use 1 for unbiased OPD"
        )
    return out


def split_list(text: str) -> list[str]:
    return [part.strip() for part in re.split(r"[,\s]+", text) if part.strip()]


def _coerce(owner: str, name: str, hint, value):
    """Turn a YAML / env string value into the field's type; errors name the setting and the expected type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() in ("none", "null"):
            if type(None) in typing.get_args(hint):
                return None
        if base is str or typing.get_origin(base) is list:
            return text if base is str else split_list(text)  # strings stay verbatim (YAML would read off as False)
        value = yaml.safe_load(text) if text else text
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"{owner}.{name} cannot be empty; expected {getattr(base, '__name__', base)}")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            if isinstance(value, bool):  # YAML 1.1 reads an unquoted off/no/yes as a bool
                raise TypeError
            return str(value)
        if typing.get_origin(base) is list:
            if isinstance(value, str):
                return split_list(value)
            if isinstance(value, (list, tuple)):
                return [str(v) for v in value]
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"{owner}.{name}={value!r} is not valid; expected {getattr(base, '__name__', base)}") from None
    return value


def _typed(key: str, value) -> tuple[str, object]:
    """One setting as (config key, typed value); `key` is a TrainConfig field, `algo.<name>`, a bare algorithm field
    or a launcher variable name."""
    key = ENV_VARS.get(key, key)
    train_hints, algo_hints = typing.get_type_hints(TrainConfig), typing.get_type_hints(OPDConfig)
    if key.startswith("algo."):
        sub = key[len("algo.") :]
        if sub not in algo_hints:
            raise ValueError(f"unknown setting {key!r}; valid algorithm keys: {', '.join(sorted(algo_hints))}")
        return key, _coerce("OPDConfig", sub, algo_hints[sub], value)
    if key in train_hints and key != "algo":
        return key, _coerce("TrainConfig", key, train_hints[key], value)
    if key in algo_hints:
        return f"algo.{key}", _coerce("OPDConfig", key, algo_hints[key], value)
    valid = sorted([k for k in train_hints if k != "algo"] + [f"algo.{k}" for k in algo_hints])
    raise ValueError(f"unknown setting {key!r}; valid keys: {', '.join(valid)} (or a launcher variable name)")


def _flat(cfg: TrainConfig) -> dict:
    out = cfg.to_dict()
    algo = out.pop("algo")
    return {**out, **{f"algo.{k}": v for k, v in algo.items()}}


def _items(settings: dict):
    """(key, value) pairs; a YAML's nested `algo:` mapping becomes `algo.<name>` keys."""
    for key, value in settings.items():
        if key == "algo" and isinstance(value, dict):
            yield from ((f"algo.{sub}", sub_value) for sub, sub_value in value.items())
        else:
            yield key, value


def merge(layers, base: TrainConfig | None = None) -> TrainConfig:
    """`base` (default: the defaults) with each (label, {key: value}) layer applied in order and the result validated
    once, so a combination that only the final layers make valid is never checked half-applied. An error names the
    layer that set the bad value: `label` is a string, or a function of (key, value) for per-variable labels."""
    flat, origin = _flat(base or TrainConfig()), {}  # origin: key -> (layer number, label)
    for layer, (label, settings) in enumerate(layers):
        for key, value in _items(settings):
            where = label(key, value) if callable(label) else label
            try:
                name, typed = _typed(key, value)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}" if where else str(exc)) from None
            flat[name], origin[name] = typed, (layer, where)
    algo = {k[len("algo.") :]: flat.pop(k) for k in list(flat) if k.startswith("algo.")}
    try:
        return TrainConfig(**flat, algo=OPDConfig.from_dict(algo))
    except ValueError as exc:
        # a refusal may name two settings (adv_estimator, then the top_k to change): blame the layer that set the
        # later one, and within one layer the setting named last
        named = [
            (origin[key][0], i, origin[key][1])
            for i, (owner, name) in enumerate(re.findall(r"\b(OPDConfig|TrainConfig)\.(\w+)", str(exc)))
            if (key := f"algo.{name}" if owner == "OPDConfig" else name) in origin
        ]
        where = max(named)[2] if named else ""
        raise ValueError(f"{where}: {exc}" if where else str(exc)) from None


def resolve(base: TrainConfig | None = None, overrides: dict | None = None) -> TrainConfig:
    """A validated TrainConfig from `base` with `overrides` ({key: value}, values typed or strings) applied."""
    return merge([("", overrides or {})], base)


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping of settings (unvalidated; `preset:` included)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"config file {path}{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path}: expected a mapping of settings at the top level, got {type(data).__name__}"
        )
    return data


def env_overrides(environ: dict[str, str] | None = None, reference: TrainConfig | None = None) -> dict[str, str]:
    """The launcher variables set (non-empty) in the environment, as {VAR: text}. With `reference` (the config the
    launcher's own defaults give), a variable whose value equals the reference's is left out: it is the launcher's
    ${VAR:-default} (or the caller repeating it), so it must not beat a --config YAML."""
    environ = os.environ if environ is None else environ
    found = {var: environ[var] for var in ENV_VARS if environ.get(var, "") != ""}
    if reference is None:
        return found
    ref = _flat(reference)

    def is_default(var: str, text: str) -> bool:
        try:
            name, value = _typed(var, text)
        except ValueError:
            return False  # kept, so that the final merge reports it with the variable's name
        return value == ref[name]

    return {var: text for var, text in found.items() if not is_default(var, text)}


def _launcher_label(var: str, value) -> str:
    return f"launcher variable {var}={value!r}"


def from_env(base: TrainConfig | None = None, environ: dict[str, str] | None = None) -> TrainConfig:
    """`base` with the launcher variables applied; an error names the variable that set the bad value."""
    return merge([(_launcher_label, env_overrides(environ))], base)


def load_config(
    preset_name: str | None = None,
    config: str | Path | None = None,
    environ: dict[str, str] | None = None,
    settings: dict | None = None,
) -> TrainConfig:
    """The one merge behind `opd train`: defaults < preset < YAML < launcher variables < key=value, validated once.

    The preset is `preset_name` (`--preset`, which the launchers pass from PRESET) or the one the YAML names. A
    launcher variable equal to what `preset_name` (default opd) gives is the launcher's own ${VAR:-default} (a test
    keeps the launchers' defaults equal to the presets), so it does not beat the YAML; `environ` None: not read."""
    data = read_yaml(config) if config is not None else {}
    named = data.pop("preset", None)
    if named is not None and not isinstance(named, str):
        raise ValueError(f"config file {config}: preset={named!r} is not valid; expected a preset name")
    if named is not None and preset_name is not None and named != preset_name:
        raise ValueError(f"config file {config} names preset {named!r}, but --preset {preset_name} was given")
    chosen = preset_name or named
    layers: list = []
    if chosen:
        try:
            layers.append((f"preset {chosen}", preset(chosen)))
        except ValueError as exc:
            raise ValueError(f"config file {config}: {exc}" if named else str(exc)) from None
    if config is not None:
        layers.append((f"config file {config}", data))
    if environ is not None:
        reference = resolve(None, preset(preset_name or "opd"))
        layers.append((_launcher_label, env_overrides(environ, reference)))
    layers.append(("", settings or {}))
    return merge(layers)


def from_yaml(path: str | Path) -> TrainConfig:
    """A YAML file over the preset it names (if any) over the defaults."""
    return load_config(config=path)


def _short(path: str | None) -> str:
    if not path:
        return "none"
    name = Path(path.rstrip("/")).name
    return Path(name).stem if name.endswith(".parquet") else name


def run_name_from(cfg: TrainConfig) -> str:
    """A run name from the settings: estimator, dataset, student, teacher, lengths, temperatures, n, batch, K,
    strategy, weight mode and lr."""
    a = cfg.algo
    parts = [
        a.adv_estimator,
        _short(cfg.train_dataset),
        f"stu-{_short(cfg.actor_model_path)}",
    ]
    if a.needs_teacher:
        parts.append(f"tch-{_short(cfg.reward_model_path)}")
    parts += [
        f"p{cfg.max_prompt_length}-r{cfg.max_resp_length}",
        f"t{a.temperature:g}" + (f"-tt{a.teacher_temperature:g}" if a.needs_teacher else ""),
        f"n{cfg.n_responses}-b{cfg.mini_batch_size}",
    ]
    if a.needs_teacher:
        parts.append(f"k{a.top_k}-{a.top_k_strategy}-{a.reward_weight_mode}")
    parts.append(f"lr{cfg.lr:g}")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "_".join(parts))


def config_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = [
    "ENV_VARS",
    "TrainConfig",
    "resolve",
    "merge",
    "load_config",
    "from_yaml",
    "from_env",
    "env_overrides",
    "run_name_from",
    "config_yaml",
]
