"""A verl platform for machines without an accelerator, so verl's own `main_ppo` runs end to end in CPU tests.

Selected by verl's switch ``VERL_PLATFORM=cpu``. verl schedules its workers on Ray accelerator resources, so the
platform names the Ray resource "GPU" and the run declares logical GPUs (``+ray_kwargs.ray_init.num_gpus=N``);
no CUDA code runs. Three facts of verl 0.9.1 shape it:
- verl calls ``get_torch_device().<fn>`` (a ``torch.cuda`` stand-in) for memory stats, RNG and the device name used
  by the FLOPs counter; `CPUDeviceModule` answers those calls and lets the rest fail loudly.
- the workers' process group is ``"cpu:gloo,<device>:<backend>"``, which torch rejects for device "cpu" (duplicate
  device type), so ``initialize_global_process_group_ray`` is wrapped to default to plain "gloo".
- verl looks its FSDP engines up by device ("cuda"/"npu" only): ``VERL_ENGINE_DEVICE=cuda`` selects them; the
  engines themselves place tensors with the platform's device, i.e. on the CPU.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

from opd.engines.verl.registration import PLATFORM_NAME, platform_requested


class CPUDeviceModule:
    """The ``torch.cuda``-shaped module verl asks the platform for; no device memory, one device, the CPU RNG."""

    @staticmethod
    def is_available() -> bool:
        return False  # verl's GPU-memory reports and per-device RNG paths check this and skip themselves

    @staticmethod
    def get_device_name(device=None) -> str:
        return "CPU"

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def mem_get_info(device=None) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    @staticmethod
    def _zero(*args, **kwargs) -> int:
        return 0

    @staticmethod
    def _noop(*args, **kwargs) -> None:
        return None

    memory_allocated = memory_reserved = max_memory_allocated = max_memory_reserved = _zero
    empty_cache = synchronize = set_device = ipc_collect = set_per_process_memory_fraction = _noop
    reset_peak_memory_stats = reset_accumulated_memory_stats = _noop
    get_rng_state, set_rng_state = staticmethod(torch.get_rng_state), staticmethod(torch.set_rng_state)
    manual_seed = manual_seed_all = staticmethod(torch.manual_seed)

    def __getattr__(self, name):
        if hasattr(torch.cpu, name):  # streams, events, StreamContext: torch.cpu has CPU versions of these
            return getattr(torch.cpu, name)
        raise AttributeError(
            f"OPD's CPU platform has no device function {name!r} (verl asked for get_torch_device().{name})"
        )


_DEVICE_MODULE = CPUDeviceModule()


class CPUPlatform(PlatformBase):
    """verl's platform interface answered for the CPU: gloo collectives, logical Ray GPUs, no IPC, no profiler."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return platform_requested()  # never chosen by verl's auto-detection, only by VERL_PLATFORM=cpu

    def current_device(self) -> str:
        return "cpu"  # verl moves tensors with .to(current_device()), so a device string, not an index

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index=None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"  # what Ray sets for the logical GPUs it hands out

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


def _wrap_process_group_init() -> None:
    import verl.utils.distributed as verl_dist

    original = verl_dist.initialize_global_process_group_ray
    if getattr(original, "_opd_gloo", False):
        return

    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or "gloo")

    initialize_global_process_group_ray._opd_gloo = True
    verl_dist.initialize_global_process_group_ray = initialize_global_process_group_ray


def gloo_patch_applied() -> bool:
    import verl.utils.distributed as verl_dist

    return getattr(verl_dist.initialize_global_process_group_ray, "_opd_gloo", False)


def register_cpu_platform() -> None:
    """Register the platform, default VERL_ENGINE_DEVICE to cuda and wrap the process-group init (idempotent).

    Runs while verl's package is being imported, i.e. before `verl.workers.engine_workers` binds the wrapped name.
    """
    PlatformRegistry.register(platform=PLATFORM_NAME)(CPUPlatform)
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    _wrap_process_group_init()
