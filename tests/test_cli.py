"""The `opd` dispatcher: every listed subcommand resolves to a module with a working --help."""

import importlib
import subprocess
import sys

import pytest

from opd.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for words in COMMANDS:
        assert " ".join(words) in out


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("words", list(COMMANDS), ids=lambda w: "-".join(w))
def test_each_subcommand_has_help(words):
    module_name, _ = COMMANDS[words]
    module = importlib.import_module(module_name)
    assert callable(module.main)
    proc = subprocess.run([sys.executable, "-m", "opd", *words, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
