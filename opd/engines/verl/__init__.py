"""OPD's verl plugin: verl imports this package in every process through the `verl.plugins` entry point.

It is inert unless switched on (see `registration`): ``OPD_VERL=1`` registers the ``opd_hf`` rollout backend,
``VERL_PLATFORM=cpu`` the CPU platform. verl hides a plugin's import errors, so call `registration_status()` (or
``python -m opd.engines.verl.selfcheck``) to fail loudly when registration did not happen. Nothing here imports
verl unless a switch is on, and `opd.core` never imports this package.
"""

from opd.engines.verl.registration import (
    PLATFORM_NAME,
    ROLLOUT_NAME,
    SUPPORTED_VERL,
    RegistrationError,
    on_plugin_load,
    registration_status,
)

__all__ = ["PLATFORM_NAME", "ROLLOUT_NAME", "SUPPORTED_VERL", "RegistrationError", "registration_status"]

on_plugin_load()
