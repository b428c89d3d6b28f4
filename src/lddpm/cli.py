"""Command-line entry point: `lddpm <command> ...`.

Each command group lives in `lddpm.commands.<group>` and exposes `register(subparsers)`;
heavy imports happen inside the command functions so `lddpm --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import time
import traceback

from lddpm import __version__
from lddpm.errors import LddpmError

# Command groups, in the order their commands appear in `lddpm --help`.
COMMAND_MODULES = (
    "lddpm.commands.data",  # prepare
    "lddpm.commands.train",  # train, train-vae, sample
    "lddpm.commands.edit",  # edit, inpaint, upscale, denoise
    "lddpm.commands.ema",  # ema (post-hoc EMA reconstruction)
    "lddpm.commands.evaluate",  # eval, fid-ref, train-classifier
    "lddpm.commands.study",  # study, demo
    "lddpm.commands.hub",  # import, export (diffusers folders)
    "lddpm.commands.verify",  # verify-cache
    "lddpm.commands.serve",  # serve (the local web page)
)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`lddpm CMD: error: ...`, exit 2), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system failure: what happened to which file, and the fix."""
    if exc.errno is None:  # e.g. PIL's "cannot identify image file ...": the message names the file
        return f"{exc}; check or replace that file"
    where = exc.filename if exc.filename is not None else "a file"
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {where}; free some space and run the command again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied: {where}; choose a location you can read and write"
    if exc.errno == errno.ENOENT:
        return f"{where} does not exist; check the path"
    if exc.errno == errno.EISDIR:
        return f"{where} is a folder, not a file; give a file path"
    if exc.errno == errno.ENOTDIR:
        return f"{where}: a part of this path is a file, not a folder; choose another path"
    if exc.errno == errno.ENAMETOOLONG:
        return f"the file name {where} is too long; choose a shorter path"
    return f"{exc.strerror or exc} ({where}); check the path and the disk"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for MemoryError and for torch's CPU/GPU allocation failures."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def memory_message(exc: BaseException) -> str:
    """One line for an allocation that cannot succeed."""
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return ("out of memory: a size asked for is too large for this machine"
            + (f" ({detail})" if detail else "")
            + "; lower the resolution, batch size, number of images or model size")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = Parser(
        prog="lddpm",
        description="Train, sample and evaluate diffusion models (pixel and latent space).",
    )
    parser.add_argument("--version", action="version", version=f"lddpm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one command; user errors print one line and exit with status 2.

    User errors are LddpmError, operating-system failures (OSError: missing or unwritable paths, a
    full disk) and allocations that cannot succeed; anything else is a bug and keeps its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except LddpmError as exc:
        _fail(args.command, str(exc))
    except OSError as exc:
        _fail(args.command, os_error_message(exc))
    except (MemoryError, RuntimeError) as exc:
        if is_out_of_memory(exc):
            _fail(args.command, memory_message(exc))
        if _job_rank() is not None:
            from lddpm.distributed import is_peer_failure

            if is_peer_failure(exc):  # a consequence: the process that failed first printed the cause
                _stop_after_peer(args.command)
        if str(exc).startswith("Error(s) in loading state_dict"):  # a checkpoint that does not fit the network
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else ""
            _fail(args.command, f"the checkpoint's tensors do not fit the network ({first[:200]}); "
                  "use a checkpoint written with this run's config")
        raise
    except KeyboardInterrupt:
        print(f"lddpm {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    return int(result or 0)


def entry() -> None:
    """The `lddpm` console script and `python -m lddpm`: main(), then the exit that torchrun workers need."""
    from lddpm import distributed

    try:
        status = main()
    except SystemExit as exc:
        status = exc.code
    except BaseException:  # a bug: keep its traceback, and still leave a torchrun worker safely
        if not distributed._joined_group:
            raise
        traceback.print_exc()
        status = 1
    distributed.exit_process(status)


# A process that stopped because another process of its torchrun job failed waits this long before
# exiting, so that torchrun sees the failing process first and names it as the root cause.
PEER_FAILURE_GRACE_S = 2.0


def _job_rank() -> int | None:
    """This process's rank in a torchrun job of several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    return int(os.environ.get("RANK", "0") or 0)


def _fail(command: str, message: str):
    """Print `lddpm COMMAND: error: MESSAGE` as one line and exit with status 2.

    In a torchrun job the line names the rank (`error: rank 1: ...`) and is also given to torchrun
    (TORCHELASTIC_ERROR_FILE), whose failure summary then shows it as the root cause.
    """
    message = " ".join(str(message).split()) or "failed"
    rank = _job_rank()
    line = f"lddpm {command}: error: {message}" if rank is None else f"lddpm {command}: error: rank {rank}: {message}"
    print(line, file=sys.stderr, flush=True)
    if rank is not None:
        from lddpm.distributed import record_elastic_error

        record_elastic_error(line)
    sys.exit(2)


def _stop_after_peer(command: str):
    """One line (no traceback) for a rank whose collective failed because another rank died; exit status 1."""
    print(f"lddpm {command}: rank {_job_rank()} stopped because another process of the job failed "
          "(its error names the cause)", file=sys.stderr, flush=True)
    time.sleep(PEER_FAILURE_GRACE_S)
    sys.exit(1)


if __name__ == "__main__":
    entry()
