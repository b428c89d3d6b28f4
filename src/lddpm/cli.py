"""Command-line entry point: `lddpm <command> ...`.

Each command group lives in `lddpm.commands.<group>` and exposes `register(subparsers)`;
heavy imports happen inside the command functions so `lddpm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lddpm import __version__
from lddpm.errors import LddpmError

# Command groups, in the order their commands appear in `lddpm --help`.
COMMAND_MODULES = (
    "lddpm.commands.data",  # prepare
    "lddpm.commands.train",  # train, train-vae, sample
    "lddpm.commands.evaluate",  # eval, fid-ref, train-classifier
    "lddpm.commands.study",  # study, demo
    "lddpm.commands.hub",  # import, export (diffusers folders)
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="lddpm",
        description="Train, sample and evaluate diffusion models (pixel and latent space).",
    )
    parser.add_argument("--version", action="version", version=f"lddpm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one command; user errors print one line and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except LddpmError as exc:
        print(f"lddpm {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"lddpm {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
