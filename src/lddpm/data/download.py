"""Download a file with progress and refuse it unless its MD5 matches the published one."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from lddpm.errors import LddpmError


def md5_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex MD5 of a file (only to compare with published checksums)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: str | os.PathLike, md5: str, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch `url` into `dest` (via `dest.part`), verify its MD5, and delete the partial file on any failure.

    An existing `dest` whose MD5 already matches is kept without downloading.
    """
    from tqdm import tqdm

    dest = Path(dest)
    if dest.is_file() and md5_file(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        raise LddpmError(f"download of {url} failed: {exc}; check the network or place the file at {dest} yourself")
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise LddpmError(
            f"download of {url} has MD5 {digest.hexdigest()}, expected {md5}; the partial file was deleted "
            "(a truncated or altered download); try again"
        )
    os.replace(part, dest)
    return dest
