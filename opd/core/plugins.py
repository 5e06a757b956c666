"""Loading algorithm plugins: modules that register an estimator, strategy, weight mode or policy loss by name.

Why: a registry entry only helps if it exists before a config names it. `OPDConfig` calls `load_plugins()` before
validating, so a plugin is selectable from YAML or an environment variable with no edit to the core:
- an installed package declares an entry point in the group `opd.plugins` (imported once per process), e.g.
  `[project.entry-points."opd.plugins"] my_algo = "my_pkg.opd_algo"` in its pyproject.toml;
- a local module is named in `OPD_PLUGINS` (comma-separated importable modules), e.g.
  `OPD_PLUGINS=my_algo bash on_policy_distillation.sh` with `ADV_ESTIMATOR=my_estimator`.
A plugin module registers at import time (`@register_estimator(...)`, `@POLICY_LOSSES.register(...)`, ...).
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "opd.plugins"
ENV_VAR = "OPD_PLUGINS"

_entry_points_loaded = False


class PluginError(ImportError):
    """A named plugin could not be imported (the message names where it was named and why it failed)."""


def load_plugins() -> None:
    """Import every `opd.plugins` entry point (once) and every module named in $OPD_PLUGINS (idempotent)."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as err:  # a broken plugin must be loud: a silently missing name is worse
                raise PluginError(
                    f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP}) failed to "
                    f"import: {type(err).__name__}: {err}"
                ) from err
    for name in filter(None, (part.strip() for part in os.environ.get(ENV_VAR, "").split(","))):
        try:
            importlib.import_module(name)
        except Exception as err:
            raise PluginError(f"{ENV_VAR}: cannot import {name!r}: {type(err).__name__}: {err}") from err
