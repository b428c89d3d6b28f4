import argparse
import subprocess
import sys

import pytest

from lddpm.cli import build_parser, main

def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = tuple(_subparsers())  # every registered command
# The commands README and docs describe: each must stay registered.
DOCUMENTED = ("prepare", "train", "train-vae", "sample", "eval", "fid-ref", "train-classifier", "study", "demo",
              "import", "export", "verify-cache", "serve")


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "lddpm", "--help"], capture_output=True, text=True, check=True).stdout
    for name in DOCUMENTED:
        assert name in COMMANDS, f"`lddpm {name}` is not registered"
    for name in COMMANDS:
        assert f"    {name}" in out, f"`lddpm --help` does not list {name}"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_works(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: lddpm {command}" in capsys.readouterr().out


def test_commands_share_one_set_of_defaults():
    parsers = _subparsers()
    defaults = {name: {a.dest: a.default for a in p._actions} for name, p in parsers.items()}
    for name in ("sample", "eval", "fid-ref", "train-classifier"):
        assert defaults[name]["device"] == "auto", f"lddpm {name} --device defaults to {defaults[name]['device']!r}"
    for name in ("sample", "eval"):  # None: the sampler's own default (ddpm all T, ddim 50, dpm++2m 20)
        assert defaults[name]["steps"] is None, f"lddpm {name} --steps defaults to {defaults[name]['steps']!r}"
        assert defaults[name]["sampler"] == defaults["sample"]["sampler"]
