"""verl loads the plugin by itself (entry point), the switches decide what it registers, and every way registration
can fail is reported in one line instead of being swallowed by verl's plugin loop."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

if os.environ.get("CI", "").lower() in ("1", "true"):  # CI installs the verl extra: a broken install must fail
    import verl  # noqa: F401
else:
    pytest.importorskip("verl")

from opd.engines.verl import registration  # noqa: E402

pytestmark = pytest.mark.slow  # each subprocess imports verl: ~15 s on a shared 2-core host


def python(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("OPD_VERL", "VERL_PLATFORM", "VERL_ENGINE_DEVICE")}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_verl_alone_registers_rollout_and_platform():
    """No import of opd by hand: verl's entry-point loop must load and register the plugin."""
    out = python(
        "import sys, os, verl\n"
        "print('by_verl', 'opd.engines.verl' in sys.modules)\n"
        "from verl.workers.rollout.replica import get_rollout_replica_class\n"
        "from verl.workers.rollout.base import get_rollout_class\n"
        "from verl.plugin.platform import get_platform\n"
        "print('replica', get_rollout_replica_class('opd_hf').__name__)\n"
        "print('adapter', get_rollout_class('opd_hf', 'async').__name__)\n"
        "p = get_platform(); print('platform', type(p).__name__, p.device_name, p.communication_backend_name())\n"
        "print('engine_device', os.environ.get('VERL_ENGINE_DEVICE'))\n"
        "from opd.engines.verl import registration_status; s = registration_status()\n"
        "print('status', s['verl'], s['rollout'], s['platform'])\n",
        OPD_VERL="1",
        VERL_PLATFORM="cpu",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["by_verl"] == "True"
    assert lines["replica"] == "HFReplica" and lines["adapter"] == "HFServerAdapter"
    assert lines["platform"] == "CPUPlatform cpu gloo"
    assert lines["engine_device"] == "cuda"
    assert lines["status"] == "0.9.1 opd_hf cpu"


def test_inert_without_switches_and_selfcheck_says_why():
    out = python(
        "import sys, verl\n"
        "from verl.plugin.platform import PlatformRegistry\n"
        "print('by_verl', 'opd.engines.verl' in sys.modules)\n"
        "print('rollout_code', 'verl.workers.rollout.replica' in sys.modules)\n"
        "print('cpu', PlatformRegistry.get('cpu'))\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["by_verl", "True", "rollout_code", "False", "cpu", "None"]
    check = subprocess.run(
        [sys.executable, "-m", "opd.engines.verl.selfcheck", "--rollout"],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "OPD_VERL"},
    )
    assert check.returncode == 1
    assert (
        check.stderr.strip()
        .splitlines()[-1]
        .startswith("opd verl plugin: NOT OK: rollout 'opd_hf' is not registered because OPD_VERL is not set")
    )


def test_plugin_disabled_by_verl_policy_is_reported():
    out = subprocess.run(
        [sys.executable, "-m", "opd.engines.verl.selfcheck"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OPD_VERL": "1", "VERL_USE_EXTERNAL_PLUGINS": "none"},
    )
    assert out.returncode == 1 and "VERL_USE_EXTERNAL_PLUGINS='none'" in out.stderr


def test_unsupported_verl_version_names_both_versions(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.0")
    with pytest.raises(registration.RegistrationError, match=r"verl 0\.10\.0 is installed .* verl>=0\.9\.1,<0\.10"):
        registration.check_verl_version()


def test_a_failure_inside_verls_plugin_loop_is_kept_and_raised(monkeypatch, capsys):
    def broken():
        raise ImportError("simulated")

    monkeypatch.setenv("OPD_VERL", "1")
    monkeypatch.setattr(registration, "register_rollout", broken)
    monkeypatch.setattr(registration, "_load_error", None)
    registration.on_plugin_load()
    assert "[opd] verl plugin registration failed: ImportError: simulated" in capsys.readouterr().err
    with pytest.raises(registration.RegistrationError, match="failed while verl loaded it: ImportError: simulated"):
        registration.registration_status()
