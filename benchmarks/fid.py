"""FID feature extraction speed with the pinned Inception network: images/s per batch size and memory layout.

    python benchmarks/fid.py                        # batch 25/50/100, with and without channels_last
    python benchmarks/fid.py --quick                # tiny run, to check the script works
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/fid.py   # the faster allocator

Also reports how far channels_last moves the features (must stay ~1e-6) and the time of one
Frechet distance (scipy sqrtm of a 2048x2048 product). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lddpm.metrics import frechet_distance, load_inception

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402


def measure(batch_size: int, channels_last: bool, images: np.ndarray, reference: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """images/s over all `images` after one warm-up batch; features of the first batch for comparison."""
    ext = load_inception(batch_size=batch_size, channels_last=channels_last)
    first = ext.features_batch(images[:batch_size])  # warm-up (also the comparison batch)
    start = time.perf_counter()
    ext.features(images)
    elapsed = time.perf_counter() - start
    row = {
        "batch_size": batch_size,
        "channels_last": channels_last,
        "images": len(images),
        "seconds": elapsed,
        "images_per_s": len(images) / elapsed,
    }
    if reference is not None:
        n = min(len(reference), len(first))
        diff = np.linalg.norm(first[:n] - reference[:n]) / np.linalg.norm(reference[:n])
        row["feature_rel_diff_vs_first_row"] = float(diff)
    return row, first


def time_frechet(dim: int) -> float:
    """Seconds for one frechet_distance on random dim x dim covariances."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(dim + 100, dim)), rng.normal(size=(dim + 100, dim)) * 1.1
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    start = time.perf_counter()
    frechet_distance(a.mean(0), s1, b.mean(0), s2)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    """Measure, print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--num", type=int, default=200, help="images per configuration (after warm-up)")
    parser.add_argument("--resolution", type=int, default=32, help="input image size (resized to 299 inside)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="4 images, batch 2, and a 128-d Frechet distance")
    parser.add_argument("--out", default="benchmarks/results/fid.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch_size, args.num = [2], 4
    images = np.random.default_rng(0).integers(0, 256, size=(args.num, args.resolution, args.resolution, 1), dtype=np.uint8)

    rows, reference = [], None
    for bs in args.batch_size:
        for channels_last in (False, True):
            row, first = measure(bs, channels_last, images, reference)
            if reference is None:
                reference = first
            rows.append(row)
    fid_dim = 128 if args.quick else 2048
    frechet_s = time_frechet(fid_dim)

    header = f"{'batch':>5} {'channels_last':>13} {'images':>6} {'seconds':>8} {'images/s':>9} {'feature rel diff':>17}"
    print(header)
    print("-" * len(header))
    for r in rows:
        diff = r.get("feature_rel_diff_vs_first_row")
        print(f"{r['batch_size']:>5} {str(r['channels_last']):>13} {r['images']:>6} {r['seconds']:>8.2f} "
              f"{r['images_per_s']:>9.2f} {'-' if diff is None else f'{diff:.2e}':>17}")
    print(f"Frechet distance ({fid_dim}-d, scipy sqrtm): {frechet_s:.2f} s")
    result = {
        "benchmark": "fid-features", "quick": args.quick, "threads": torch.get_num_threads(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""), "resolution": args.resolution,
        "torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
        "machine": platform.machine(), "rows": rows, "frechet_distance": {"dim": fid_dim, "seconds": frechet_s},
    }
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
