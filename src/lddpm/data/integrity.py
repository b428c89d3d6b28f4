"""Integrity of cache arrays: what the manifest promises is checked on every open.

At creation each array file gets a record `{shape, dtype, sha256, size, sample_sha256}` in the
manifest, and `checksum` is the sha256 of the arrays' sha256 strings. Every open checks:
  - `checksum` agrees with the per-array sha256 strings (an edited manifest is refused);
  - each file's size (truncated or extended files are refused);
  - the full sha256 when the file is small (< FULL_HASH_BYTES), else the sha256 of SAMPLE_BLOCKS
    evenly spaced blocks (always including the first and the last block, so the .npy header).
`verify_arrays(..., full=True)` (the `lddpm verify-cache` command) hashes every byte.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lddpm.errors import LddpmError

FULL_HASH_BYTES = 64 << 20  # files up to 64 MiB are fully hashed on every open
SAMPLE_BLOCKS = 64
BLOCK_BYTES = 64 << 10  # 64 blocks of 64 KiB: 4 MiB read per large file


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sampled_sha256(path: str | os.PathLike) -> str:
    """sha256 of the file size and SAMPLE_BLOCKS evenly spaced blocks (the whole file if it is small)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"{size}|".encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * BLOCK_BYTES:
            digest.update(f.read())
        else:
            last = size - BLOCK_BYTES
            for k in range(SAMPLE_BLOCKS):
                f.seek(last * k // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(BLOCK_BYTES))
    return digest.hexdigest()


def combined_checksum(arrays: dict, names: tuple[str, ...]) -> str:
    """The manifest's `checksum`: sha256 of the arrays' sha256 strings, in `names` order."""
    return hashlib.sha256("".join(arrays[n]["sha256"] for n in names).encode()).hexdigest()


def array_record(path: Path, shape, dtype) -> dict:
    """The manifest record of one array file."""
    return {"shape": list(shape), "dtype": str(dtype), "sha256": sha256_file(path),
            "size": os.path.getsize(path), "sample_sha256": sampled_sha256(path)}


def verify_arrays(folder: Path, manifest: dict, names: tuple[str, ...], *, fix: str, full: bool = False) -> None:
    """Check `folder`'s array files against the manifest; LddpmError (ending with `fix`) if they differ."""
    arrays = manifest.get("arrays")
    if not isinstance(arrays, dict) or not all(isinstance(arrays.get(n), dict) and "sha256" in arrays[n] for n in names):
        raise LddpmError(f"{folder}/manifest.json has no array checksums for {', '.join(names)}; {fix}")
    if manifest.get("checksum") != combined_checksum(arrays, names):
        raise LddpmError(f"{folder}/manifest.json was edited: its checksum does not match its array checksums; {fix}")
    for name in names:
        path, record = folder / name, arrays[name]
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise LddpmError(f"cannot read {path} ({exc.strerror}); {fix}") from None
        if "size" in record and size != record["size"]:
            raise LddpmError(f"{path} has {size} bytes, the manifest says {record['size']}: the file changed; {fix}")
        if full or size <= FULL_HASH_BYTES:
            if sha256_file(path) != record["sha256"]:
                raise LddpmError(f"{path} is corrupt: its sha256 differs from the manifest's; {fix}")
        elif "sample_sha256" in record and sampled_sha256(path) != record["sample_sha256"]:
            raise LddpmError(f"{path} is corrupt: its bytes differ from the manifest's (sampled check); {fix}")
