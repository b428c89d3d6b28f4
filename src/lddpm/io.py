"""Atomic file output: results, checkpoints, caches and reports are written through these functions
(the training log, appended line by line, is not).

A file is written to a hidden temporary name in its own folder (`.NAME.tmp-PID-RANDOM`), flushed,
then moved over the target with `os.replace`, so a reader (or a crash) never sees half a file and
the previous good file stays in place until the new one is complete. A full disk raises one
LddpmError that says so. Stale temporary files of a killed writer match `TEMP_PATTERN` and are
removed by `remove_stale_temp_files`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from lddpm.errors import LddpmError

try:  # POSIX; elsewhere folder locks are not taken
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

TEMP_MARK = ".tmp-"
LOCK_FILE = ".lddpm-lock"
_HELD_LOCKS: dict[str, int] = {}  # folders this process holds a lock on -> nesting depth
TEMP_PATTERN = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}(\.[a-z0-9]+)?$")


def temp_path(path: str | Path, suffix: str = "") -> Path:
    """A hidden temporary sibling of `path` (same folder, so `os.replace` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _os_error(exc: OSError, path: Path) -> LddpmError:
    """One clear message for an operating-system failure while writing `path`."""
    if exc.errno == errno.ENOSPC:
        return LddpmError(f"disk full while writing {path}; free some space and run the command again "
                          "(the previous file, if any, is unchanged)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LddpmError(f"cannot write {path}: permission denied; choose a writable location")
    if exc.errno == errno.EEXIST:  # mkdir of a parent that is a regular file
        return LddpmError(f"cannot write {path}: a part of this path is a file, not a folder; choose another path")
    if exc.errno in (errno.EISDIR, errno.ENOTDIR):
        return LddpmError(f"cannot write {path}: {exc.strerror.lower()}; choose another path")
    return LddpmError(f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _os_error(exc, path) from None
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _os_error(exc, path) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return write_bytes(path, text.encode("utf-8"))


def json_default(obj: Any) -> Any:
    """JSON encoding of numpy scalars and arrays and of paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def finite_or_none(value: Any) -> Any:
    """NaN / inf -> None, so that a result stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """`json.dumps` with the package's encoder and a final newline."""
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=json_default) + "\n"


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """A JSON object read from `path`; missing, unreadable, invalid or not an object -> one LddpmError ending in `fix`."""
    path = Path(path)
    if not path.is_file():
        raise LddpmError(f"{path} not found; {fix}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise LddpmError(f"cannot read {path}: it is damaged or not JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise LddpmError(f"{path} does not hold a JSON object; {fix}")
    return data


def write_json(path: str | Path, obj: Any, *, sort_keys: bool = False) -> Path:
    """Write indented JSON atomically."""
    return write_text(path, to_json(obj, sort_keys=sort_keys))


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a uint8 image (H, W), (H, W, 1) or (H, W, 3) as PNG atomically."""
    from PIL import Image

    image = np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    with atomic_path(path, ".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write arrays as an .npz file atomically."""
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **arrays)
    return Path(path)


@contextlib.contextmanager
def rust_io_errors(path: str | Path) -> Iterator[None]:
    """Turn an I/O failure that a Rust writer (safetensors) reports as text, "... (os error 28)", into an OSError,
    so that a full disk is one clear error like any other write's."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def write_with(path: str | Path, writer: Callable[[Path], Any], suffix: str = "") -> Path:
    """Call `writer(tmp_path)` and move the result into place atomically (for other formats)."""
    with atomic_path(path, suffix) as tmp:
        writer(tmp)
    return Path(path)


def make_temp_dir(target: str | Path) -> Path:
    """A new hidden temporary folder next to `target`, for `swap_in_dir`."""
    target = Path(target)
    tmp = temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise _os_error(exc, target) from None
    return tmp


def swap_in_dir(tmp: Path, target: str | Path) -> None:
    """Move a finished temporary folder to `target`, replacing (then deleting) an existing one."""
    target = Path(target)
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def os_error(exc: OSError, path: str | Path) -> LddpmError:
    """The one-line LddpmError for an OSError while writing `path` (disk full, permission, bad path)."""
    return _os_error(exc, Path(path))


def _writer_alive(name: str) -> bool:
    """True if the process id in a temp name `.NAME.tmp-PID-HEX` is a running process on this machine."""
    match = re.search(r"\.(?:tmp|old)-(\d+)-[0-9a-f]{8}", name)
    if not match:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target`, else it is removed."""
    tmp = make_temp_dir(target)
    try:
        yield tmp
        swap_in_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temp_files(folder: str | Path, *, keep_live: bool = True) -> list[Path]:
    """Delete this package's leftover temporary files/folders in `folder` (a killed writer's).

    With `keep_live`, entries whose writer process is still running here are kept (a concurrent
    writer in the same folder is not disturbed).
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if TEMP_PATTERN.match(entry.name) or re.match(r"^\..+\.old-\d+-[0-9a-f]{8}$", entry.name):
            if keep_live and _writer_alive(entry.name):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry)
    return removed


def _lock_holder(handle) -> str:
    """Who holds a folder lock, from the lock file's JSON ("pid 123 on host h, `lddpm train ...`, since ...")."""
    try:
        handle.seek(0)
        info = json.loads(handle.read() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    return (f"process {info.get('pid')} on host {info.get('host')} (`{info.get('command', '?')}`, "
            f"since {info.get('started', '?')})")


def _command_line() -> str:
    """This process's command line, short (`lddpm train ...` for the CLI)."""
    argv = sys.argv or ["python"]
    prog = "lddpm" if argv[0].endswith(("lddpm", "__main__.py")) else Path(argv[0]).name
    return " ".join([prog, *argv[1:]])[:300]


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "folder") -> Iterator[Path]:
    """One writer per folder: hold an exclusive `fcntl.flock` on `folder/.lddpm-lock` while the block runs.

    A second writer is refused at once with an LddpmError naming the holder (pid, host, command).
    The kernel drops a flock when its process ends, SIGKILL included, so a killed writer never
    blocks the next one. The lock file stays (deleting it would race a process opening it); it holds
    the holder's pid and host, for the message. Works on local disks and on NFS (as a POSIX lock).
    """
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = str(folder.resolve())
        handle = None if key in _HELD_LOCKS else open(folder / LOCK_FILE, "a+")
    except OSError as exc:
        raise LddpmError(f"cannot write to the {what} {folder} ({exc.strerror or exc}); choose another folder (--out)") from None
    if handle is None:  # this process holds it already (e.g. `lddpm eval` and the evaluator it calls)
        _HELD_LOCKS[key] += 1
        try:
            yield folder
        finally:
            _HELD_LOCKS[key] -= 1
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LddpmError(
                    f"{what} {folder} is in use by {_lock_holder(handle)}; wait for it to finish or stop it "
                    "(one writer per folder: two would mix their files)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with contextlib.suppress(OSError):  # the holder's name is for messages only (and a full disk must not stop us)
            handle.truncate(0)
            handle.write(json.dumps(info) + "\n")
            handle.flush()
        _HELD_LOCKS[key] = 1
        try:
            yield folder
        finally:
            del _HELD_LOCKS[key]
            if created:  # a command that failed before writing anything leaves no folder behind
                with contextlib.suppress(OSError):
                    if [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                        (folder / LOCK_FILE).unlink()
                        folder.rmdir()
    finally:
        handle.close()  # closing the last descriptor of the open file releases the flock


def locks_folder(argument: str, what: str):
    """Decorator: hold `folder_lock` on the folder given as keyword `argument` (unless None) while the call runs."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            folder = kwargs.get(argument)
            with folder_lock(folder, what) if folder is not None else contextlib.nullcontext():
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def existing_parent(path: str | Path) -> Path:
    """`path` if it exists, else its nearest existing parent folder."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Free space (bytes, for this user) on the file system that holds `path` (or would hold it)."""
    return shutil.disk_usage(existing_parent(path)).free


def require_free_space(path: str | Path, needed_bytes: int, what: str, fix: str) -> None:
    """Refuse work whose output (`needed_bytes`, written under `path`) cannot fit the free disk, before it starts."""
    free = free_bytes(path)
    if needed_bytes > free:
        raise LddpmError(f"not enough free disk space for {what}: about {needed_bytes / 1e6:,.1f} MB needed, "
                         f"{free / 1e6:,.1f} MB free for {Path(path)}; {fix}")


def reserved_memmap(path: str | Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    """`np.lib.format.open_memmap(path, mode="w+")` with the file's disk blocks reserved first (posix_fallocate).

    A memory-mapped file is sparse: without the reservation a full disk is a SIGBUS when a page of the
    mapping is written later (the process dies without a word); with it, an OSError (ENOSPC) here.
    """
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):  # a file system that cannot reserve: as before
                del array
                raise OSError(exc.errno, exc.strerror, str(path)) from None
        finally:
            os.close(fd)
    return array
