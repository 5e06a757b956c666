"""Registers the OPD trainer mode with verl lazily: in the process that imports verl's v1 trainers, right after.

Why lazily: verl loads the plugin in every Ray process, and importing ``verl.trainer.ppo.v1`` (TransferQueue, the
agent loop, datasets, ...) costs 10+ s of CPU per process on a small machine, while only the task runner looks a
trainer up. An import hook runs the registration (``import opd.engines.verl.trainer``, whose class decorator calls
verl's `register_trainer`) as soon as that package has finished executing, so ``get_trainer_cls("opd")`` works in
whichever process asks. An error there propagates to the importer, i.e. it is never silent.
"""

from __future__ import annotations

import importlib.abc
import sys

TRAINER_PACKAGE = "verl.trainer.ppo.v1"


def _register() -> None:
    import opd.engines.verl.trainer  # noqa: F401  (@register_trainer runs at import)


class _LoaderThenRegister(importlib.abc.Loader):
    """The package's own loader, then the registration."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_filename, get_resource_reader, ... of the wrapped loader
        return getattr(self._loader, name)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TRAINER_PACKAGE:
            return None
        sys.meta_path.remove(self)  # once: from here on the package imports as usual
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                spec.loader = _LoaderThenRegister(spec.loader)
                return spec
        return None


def register_trainer_on_import() -> None:
    """Register now if verl's v1 trainers are imported already, else right after they are (idempotent)."""
    if TRAINER_PACKAGE in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def trainer_registered() -> bool:
    """Whether ``trainer.v1.trainer_mode=opd`` resolves to OPD's trainer (imports verl's v1 trainers)."""
    from verl.trainer.ppo.v1 import get_trainer_cls

    from opd.engines.verl.settings import TRAINER_MODE

    try:
        cls = get_trainer_cls(TRAINER_MODE)
    except ValueError:
        return False
    return cls.__module__ == "opd.engines.verl.trainer"
