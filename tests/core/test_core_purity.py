"""The dependency direction, checked: importing the algorithm core loads no engine framework."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("verl", "ray", "transformers", "vllm")


def test_core_imports_no_engine_framework():
    code = (
        "import sys, pkgutil, importlib, opd.core\n"
        "for m in pkgutil.iter_modules(opd.core.__path__):\n"
        "    importlib.import_module('opd.core.' + m.name)\n"
        f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})\n"
        "print(len(list(pkgutil.iter_modules(opd.core.__path__))))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    n_modules, bad = int(out[0]), out[1]
    assert n_modules >= 8  # every core module was really imported (config, loss, metrics, support, ...)
    assert bad == "", f"opd.core imported engine frameworks: {bad}"
