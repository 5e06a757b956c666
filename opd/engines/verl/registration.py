"""What the plugin registers in verl, when, and the check that it really did.

Switches (read from the environment, because verl imports the plugin in every Ray process before any config exists):
- ``OPD_VERL=1`` registers OPD's rollout backend ``opd_hf`` (transformers ``generate``; select it with
  ``actor_rollout_ref.rollout.name=opd_hf``) and the OPD trainer mode (``trainer.v1.trainer_mode=opd``; registered
  when a process imports verl's v1 trainers, see `trainer_registration`).
- ``VERL_PLATFORM=cpu`` (verl's own platform switch) registers the CPU platform that lets ``main_ppo`` run without
  an accelerator.
With neither set, importing the plugin touches nothing in verl. verl loads entry points inside ``try/except`` and
logs a failure only at DEBUG level, so a failure here is kept, printed once to stderr, and raised again by
`registration_status`, which tests and launchers call to fail loudly.
"""

from __future__ import annotations

import os
import sys

ROLLOUT_NAME = "opd_hf"
TRAINER_MODE = "opd"  # trainer.v1.trainer_mode=opd selects OPD's trainer
PLATFORM_NAME = "cpu"
ENTRY_POINT = "opd"  # name under [project.entry-points."verl.plugins"] in pyproject.toml
SUPPORTED_VERL = ">=0.9.1,<0.10"
_ADAPTER_FQN = "opd.engines.verl.hf_rollout.HFServerAdapter"

_load_error: Exception | None = None


class RegistrationError(RuntimeError):
    """The plugin is not (or not fully) registered in verl; the message is one line saying why and what to do."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def rollout_requested() -> bool:
    return _truthy(os.environ.get("OPD_VERL"))


def platform_requested() -> bool:
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME


def check_verl_version() -> str:
    """The installed verl version; RegistrationError when it is outside SUPPORTED_VERL."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    try:
        installed = version("verl")
    except PackageNotFoundError:
        raise RegistrationError(
            f"verl is not installed; OPD's verl plugin supports verl{SUPPORTED_VERL}: "
            f"pip install -c constraints.txt '.[verl]'"
        ) from None
    if Version(installed) not in SpecifierSet(SUPPORTED_VERL):
        raise RegistrationError(
            f"verl {installed} is installed but OPD's verl plugin supports verl{SUPPORTED_VERL}: "
            f"pip install -c constraints.txt '.[verl]'"
        )
    return installed


def _load_replica_class():
    from opd.engines.verl.hf_rollout import HFReplica

    return HFReplica


def register_rollout() -> None:
    """Both of verl's rollout registries: the replica (server launcher) and the in-worker ServerAdapter.

    The replica loader and the adapter path are lazy, so transformers and the server code load only when selected.
    """
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = _ADAPTER_FQN
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica_class)


def on_plugin_load() -> None:
    """Run by `import opd.engines.verl` (verl's entry-point loop): register what the environment asks for."""
    global _load_error
    if not (rollout_requested() or platform_requested()):
        return
    try:
        check_verl_version()
        if platform_requested():
            from opd.engines.verl.cpu_platform import register_cpu_platform

            register_cpu_platform()
        if rollout_requested():
            register_rollout()
            from opd.engines.verl.trainer_registration import register_trainer_on_import

            register_trainer_on_import()
    except Exception as exc:  # verl would swallow it: keep it for registration_status and say it once
        _load_error = exc
        print(f"[opd] verl plugin registration failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == ENTRY_POINT and ep.value == "opd.engines.verl" for ep in entry_points(group="verl.plugins"))


def _plugins_allowed() -> bool:
    """verl's VERL_USE_EXTERNAL_PLUGINS: 'auto' (default) loads all, 'none' none, else a comma list of names."""
    policy = os.environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    return policy == "auto" or ENTRY_POINT in {name.strip() for name in policy.split(",")}


def registration_status(rollout: bool | None = None, platform: bool | None = None) -> dict:
    """Import verl and verify that what is requested (default: what the environment switches on) is registered.

    Returns {"verl": version, "rollout": name or None, "platform": name or None}; raises RegistrationError.
    """
    want_rollout = rollout_requested() if rollout is None else rollout
    want_platform = platform_requested() if platform is None else platform
    installed = check_verl_version()
    if not _entry_point_installed():
        raise RegistrationError(
            f"the 'verl.plugins' entry point {ENTRY_POINT!r} is not installed (opd was installed "
            f"before it existed?): pip install -e . again"
        )
    if not _plugins_allowed():
        raise RegistrationError(
            f"VERL_USE_EXTERNAL_PLUGINS={os.environ['VERL_USE_EXTERNAL_PLUGINS']!r} keeps verl "
            f"from loading the {ENTRY_POINT!r} plugin; unset it or add {ENTRY_POINT!r}"
        )
    import verl  # noqa: F401  (loads the entry points, hence this package's on_plugin_load)

    if _load_error is not None:
        raise RegistrationError(f"the plugin failed while verl loaded it: {type(_load_error).__name__}: {_load_error}")
    status = {"verl": installed, "rollout": None, "trainer": None, "platform": None}
    if want_rollout:
        _check_rollout()
        status["rollout"] = ROLLOUT_NAME
        _check_trainer()
        status["trainer"] = TRAINER_MODE
    if want_platform:
        _check_platform()
        status["platform"] = PLATFORM_NAME
    return status


def _check_rollout() -> None:
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    if not rollout_requested() and ROLLOUT_NAME not in RolloutReplicaRegistry._registry:
        raise RegistrationError(
            f"rollout {ROLLOUT_NAME!r} is not registered because OPD_VERL is not set: export "
            f"OPD_VERL=1 before starting verl (it must reach every Ray worker)"
        )
    try:
        replica_cls = RolloutReplicaRegistry.get(ROLLOUT_NAME)
    except ValueError as exc:
        raise RegistrationError(f"verl's RolloutReplicaRegistry has no {ROLLOUT_NAME!r}: {exc}") from None
    if replica_cls is not _load_replica_class():
        raise RegistrationError(f"verl's rollout {ROLLOUT_NAME!r} resolves to {replica_cls!r}, not OPD's HFReplica")
    if _ROLLOUT_REGISTRY.get((ROLLOUT_NAME, "async")) != _ADAPTER_FQN:
        raise RegistrationError(
            f"verl's _ROLLOUT_REGISTRY[({ROLLOUT_NAME!r}, 'async')] is "
            f"{_ROLLOUT_REGISTRY.get((ROLLOUT_NAME, 'async'))!r}, not {_ADAPTER_FQN!r}"
        )


def _check_trainer() -> None:
    from opd.engines.verl.trainer_registration import trainer_registered

    if not trainer_registered():
        raise RegistrationError(
            f"verl's trainer mode {TRAINER_MODE!r} does not resolve to OPD's trainer: export "
            f"OPD_VERL=1 before starting verl (it must reach every Ray worker)"
        )


def _check_platform() -> None:
    from verl.plugin.platform import PlatformRegistry

    from opd.engines.verl.cpu_platform import CPUPlatform, gloo_patch_applied

    if not platform_requested() and PlatformRegistry.get(PLATFORM_NAME) is None:
        raise RegistrationError(
            f"platform {PLATFORM_NAME!r} is not registered because VERL_PLATFORM is not "
            f"{PLATFORM_NAME!r}: export VERL_PLATFORM={PLATFORM_NAME}"
        )
    if PlatformRegistry.get(PLATFORM_NAME) is not CPUPlatform:
        raise RegistrationError(
            f"verl's PlatformRegistry[{PLATFORM_NAME!r}] is "
            f"{PlatformRegistry.get(PLATFORM_NAME)!r}, not OPD's CPUPlatform"
        )
    if not gloo_patch_applied():
        raise RegistrationError(
            "verl.utils.distributed.initialize_global_process_group_ray is not wrapped to use "
            "gloo: the CPU platform was registered after verl's workers imported it"
        )
