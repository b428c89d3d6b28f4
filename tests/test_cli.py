import subprocess
import sys

from lddpm.cli import build_parser


def test_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "lddpm", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "lddpm" in out
    parser = build_parser()
    assert parser.prog == "lddpm"
