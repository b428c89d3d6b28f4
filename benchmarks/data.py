"""Loader throughput from a prepared cache: batches/s and images/s, as a table and JSON.

    python benchmarks/data.py                      # synthetic 50,000 x 32x32x3 cache + 28->32 grey
    python benchmarks/data.py --cache DIR          # a real prepared cache
    python benchmarks/data.py --quick              # tiny run, to check the script works

Run with OMP_NUM_THREADS / torch threads as in training (default: 1 thread per process).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lddpm.data import ImageLoader, open_cache
from lddpm.data.cache import CACHE_FORMAT, CACHE_FORMAT_VERSION, array_checksums

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402


def synthetic_cache(folder: Path, n: int, resolution: int, channels: int) -> Path:
    """Write a cache folder of random uint8 images in the prepared layout (no source dataset needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(n, resolution, resolution, channels))
    for i in range(0, n, 8192):
        images[i:i + 8192] = rng.integers(0, 256, images[i:i + 8192].shape, dtype=np.uint8)
    images.flush()
    del images
    np.save(folder / "labels.npy", rng.integers(0, 10, n).astype(np.int64))
    arrays, checksum = array_checksums(folder, ("images.npy", "labels.npy"))  # open_cache checks them
    manifest = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "dataset": "synthetic",
                "split": "train", "count": n, "class_names": [str(i) for i in range(10)],
                "arrays": arrays, "checksum": checksum}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def measure(cache, batch_size: int, seconds: float, hflip: bool, prefetch: int) -> dict:
    """Run the loader for about `seconds` after warm-up; returns the throughput row."""
    loader = ImageLoader(cache, batch_size, seed=0, hflip=hflip)
    it = loader.iter_from(0, prefetch=prefetch)
    for _ in range(3):
        next(it)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, y = next(it)
        steps += 1
    elapsed = time.perf_counter() - start
    it.close()
    return {
        "cache": str(cache.path.name), "images": len(cache), "shape": list(cache.images.shape[1:]),
        "batch_size": batch_size, "hflip": hflip, "prefetch": prefetch, "steps": steps,
        "batches_per_s": steps / elapsed, "images_per_s": steps * batch_size / elapsed,
    }


def main(argv: list[str] | None = None) -> dict:
    """Measure, print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", action="append", default=[], help="prepared cache folder(s) to read")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="tiny synthetic cache and 0.2 s per row")
    parser.add_argument("--out", default="benchmarks/results/data.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seconds, args.batch_size = 0.2, [64]

    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(c) for c in args.cache]
        if not folders:
            n = 2048 if args.quick else 50000
            folders = [synthetic_cache(Path(tmp) / "rgb32", n, 32, 3), synthetic_cache(Path(tmp) / "grey32", n, 32, 1)]
        rows = []
        for folder in folders:
            cache = open_cache(folder)
            for bs in args.batch_size:
                for hflip, prefetch in ((False, 0), (True, 0), (True, 2)):
                    rows.append(measure(cache, bs, args.seconds, hflip, prefetch))

    header = f"{'cache':<28} {'shape':<12} {'batch':>5} {'hflip':>5} {'prefetch':>8} {'batches/s':>10} {'images/s':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        print(f"{r['cache']:<28} {shape:<12} {r['batch_size']:>5} {str(r['hflip']):>5} {r['prefetch']:>8} "
              f"{r['batches_per_s']:>10.1f} {r['images_per_s']:>11.0f}")
    result = {"benchmark": "data-loader", "quick": args.quick, **environment(), "threads": args.threads, "rows": rows}
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
