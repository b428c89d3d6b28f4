"""Cost of the cache integrity checks: the check on every open and the full verification.

Writes a synthetic cache of N 32x32 grey images and times (best of 3) a bare `np.load` of the
arrays, the check `open_cache` runs on every open (full sha256 under 64 MiB, sampled blocks
above), and the full verification of `lddpm verify-cache`. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lddpm.data import integrity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

NAMES = ("images.npy", "labels.npy")


def best_of(fn, repeats: int = 3) -> float:
    """Shortest wall time of `repeats` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(folder: Path, n: int) -> dict:
    """Write an n-image cache in `folder` and time its open check and full verification."""
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 32, 32, 1))
    images[:] = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 1), dtype=np.uint8)
    images.flush()
    del images
    np.save(folder / "labels.npy", np.zeros(n, np.int64))
    arrays = {k: integrity.array_record(folder / k, (), "uint8") for k in NAMES}
    manifest = {"arrays": arrays, "checksum": integrity.combined_checksum(arrays, NAMES)}
    size = sum(a["size"] for a in arrays.values())
    return {
        "images": n, "bytes": size, "full_hash_on_open": arrays["images.npy"]["size"] <= integrity.FULL_HASH_BYTES,
        "np_load_s": best_of(lambda: (np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy"))),
        "open_check_s": best_of(lambda: integrity.verify_arrays(folder, manifest, NAMES, fix="")),
        "full_verify_s": best_of(lambda: integrity.verify_arrays(folder, manifest, NAMES, fix="", full=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60000, 100000], help="images per cache")
    parser.add_argument("--out", default="benchmarks/results/cache_integrity.json")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(Path(tmp), n))
    print(f"{'images':>8} {'MB':>7} {'check':>8} {'np.load':>9} {'open check':>11} {'full verify':>12}")
    for r in rows:
        print(f"{r['images']:>8} {r['bytes'] / 1e6:>7.1f} {'full' if r['full_hash_on_open'] else 'sampled':>8} "
              f"{r['np_load_s'] * 1e3:>7.2f}ms {r['open_check_s'] * 1e3:>9.1f}ms {r['full_verify_s'] * 1e3:>10.1f}ms")
    write_json({"rows": rows, "note": "wall times, best of 3; shared machine"}, args.out)


if __name__ == "__main__":
    main()
