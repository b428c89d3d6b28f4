"""Do the feature backends give the same FID? Fashion-MNIST train vs test, N real images each, per backend.

    python benchmarks/fid_agreement.py               # N = 2000 (about 5 CPU minutes per backend here)
    python benchmarks/fid_agreement.py --num 100     # a quick check

The first N images of each split (32x32 cache, as `lddpm prepare fashion-mnist`) go through the
pinned Inception network with each backend; the FIDs should agree to 4 significant digits and the
features to ~1e-6 relative. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from lddpm.data import open_cache, prepare
from lddpm.metrics import fid_from_features, load_inception
from lddpm.metrics.kid import kernel_inception_distance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Features of N train and N test images per backend; FID and KID of each; their differences."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/fid_agreement.json")
    args = parser.parse_args(argv)
    splits = {s: open_cache(prepare("fashion-mnist", resolution=32, split=s, progress=False)).images[: args.num]
              for s in ("train", "test")}
    rows, features = [], {}
    for backend in args.backends:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ext = load_inception(batch_size=args.batch_size, backend=backend)
        start = time.perf_counter()
        feats = {s: ext.features(images, progress=True, desc=f"{backend} {s}") for s, images in splits.items()}
        seconds = time.perf_counter() - start
        features[backend] = np.concatenate([feats["train"], feats["test"]])
        kid = kernel_inception_distance(feats["train"], feats["test"])
        rows.append({"backend": ext.backend, "num": args.num, "fid": fid_from_features(feats["train"], feats["test"]),
                     "kid": kid["kid"], "kid_std": kid["kid_std"], "seconds": seconds,
                     "images_per_s": 2 * args.num / seconds})
    ref = features[args.backends[0]]
    for row, backend in zip(rows, args.backends):
        row["max_rel_feature_error"] = float(np.abs(features[backend] - ref).max() / np.abs(ref).max())
        row["fid_rel_diff"] = abs(row["fid"] - rows[0]["fid"]) / rows[0]["fid"]
    print(f"{'backend':<8} {'N':>6} {'FID':>12} {'KID':>12} {'rel FID diff':>13} {'max rel feat err':>17} {'images/s':>9}")
    for r in rows:
        print(f"{r['backend']:<8} {r['num']:>6} {r['fid']:>12.6f} {r['kid']:>12.3e} {r['fid_rel_diff']:>13.2e} "
              f"{r['max_rel_feature_error']:>17.2e} {r['images_per_s']:>9.2f}")
    result = {"benchmark": "fid-backend-agreement", "dataset": "fashion-mnist train vs test, 32px", "rows": rows}
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
