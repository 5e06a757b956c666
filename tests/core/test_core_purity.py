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


def test_engines_use_only_the_core_step_api():
    """Engines move tensors: from the core they import only the step API (and the config), never the building
    blocks (supports, rewards, advantages, losses), so the OPD maths cannot drift into an engine."""
    import ast
    from pathlib import Path

    import opd
    from opd.core import step

    allowed_names = set(step.__all__) | {"OPDConfig"}
    allowed_modules = {"opd.core", "opd.core.step", "opd.core.config"}
    engines = Path(opd.__file__).parent / "engines"
    files = sorted(engines.rglob("*.py"))
    assert any(f.parent.name == "local" for f in files)
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opd.core"):
                names = {alias.name for alias in node.names}
                if node.module not in allowed_modules or not names <= allowed_names:
                    bad.append(
                        f"{path.relative_to(engines)}:{node.lineno} from {node.module} import "
                        f"{', '.join(sorted(names - allowed_names) or sorted(names))}"
                    )
            elif isinstance(node, ast.Import) and any(a.name.startswith("opd.core") for a in node.names):
                bad.append(f"{path.relative_to(engines)}:{node.lineno} import {node.names[0].name}")
    assert not bad, "engines reach past the core's step API:\n" + "\n".join(bad)
