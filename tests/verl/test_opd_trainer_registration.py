"""verl resolves ``trainer.v1.trainer_mode=opd`` to OPD's trainer by itself (entry point, no import of opd by hand),
and lazily: loading the plugin does not import verl's v1 trainers (10+ s per Ray process on a small host)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

if os.environ.get("CI", "").lower() in ("1", "true"):
    import verl  # noqa: F401
else:
    pytest.importorskip("verl")

pytestmark = pytest.mark.slow  # one subprocess importing verl's trainers: ~25 s on a shared 2-core host


def test_verl_alone_resolves_the_opd_trainer_mode_lazily():
    code = (
        "import sys, verl\n"
        "print('v1_at_load', 'verl.trainer.ppo.v1' in sys.modules)\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "cls = get_trainer_cls('opd')\n"
        "print('trainer', cls.__module__ + '.' + cls.__name__, cls.__mro__[1].__name__)\n"
        "from opd.engines.verl import registration_status\n"
        "print('status', registration_status()['trainer'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_PLUGINS")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "OPD_VERL": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["v1_at_load"] == "False"
    assert lines["trainer"] == "opd.engines.verl.trainer.OPDTrainer PPOTrainerSync"
    assert lines["status"] == "opd"
