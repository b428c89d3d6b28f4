"""FID reference statistics of a prepared dataset split: built once, cached with a manifest, checked on reuse."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lddpm import __version__
from lddpm.data import open_cache, prepare
from lddpm.errors import LddpmError
from lddpm.metrics import FeatureExtractor, FeatureStats, ReferenceStats, check_images, load_inception, load_reference, save_reference
from lddpm.metrics.fid import default_reference_path, reference_files
from lddpm.progress import progress_bar as maybe_tqdm  # the name lddpm.evaluate's modules import
from lddpm.seeding import subset_indices

PR_MAX_FEATURES = 10_000  # real features kept in a reference for precision/recall
REFERENCE_SUBSET_SEED = 0  # which images of a split a reference of N < split size uses
PR_SUBSET_SEED = 1  # which of those the precision/recall features are (a seeded random subset)
REFERENCE_FORMAT = 2  # 2: precision/recall features are a random subset (1 took the first ones in cache order)


def now_iso() -> str:
    """The local time as ISO 8601, for result files."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def parse_reference(spec: str) -> tuple[str, str]:
    """'DATASET:SPLIT' (or 'DATASET', split train) -> (dataset, split)."""
    dataset, _, split = spec.partition(":")
    if not dataset:
        raise LddpmError(f"--reference must look like DATASET:SPLIT (e.g. fashion-mnist:train), got {spec!r}")
    return dataset, split or "train"


def reference_indices(total: int, num: int, seed: int = REFERENCE_SUBSET_SEED) -> np.ndarray:
    """The sorted random subset of `num` of `total` images used for a reference (all if num == total)."""
    return subset_indices(total, num, seed)


def reference_from_cache(
    cache,
    *,
    num: int | None,
    extractor: FeatureExtractor,
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> ReferenceStats:
    """Reference statistics of `num` images of a prepared cache: loaded if cached (manifest checked), else built and saved.

    The cache lives at `path` or `<cache>/fid-refs/...`; its manifest records the dataset, split,
    N, resolution, the cache checksum and the feature network's hash, and a mismatch is refused.
    """
    total = len(cache)
    num = int(num or total)
    if num > total:
        raise LddpmError(f"--num {num} is more than the {total} images of {cache.dataset}:{cache.split}; use at most {total}")
    request = {
        "format": REFERENCE_FORMAT,
        "dataset": cache.dataset,
        "split": cache.split,
        "num": num,
        "resolution": int(cache.resolution),
        "network_sha1": extractor.sha1,
        "dataset_checksum": cache.checksum,
    }
    stem = Path(path) if path else default_reference_path(cache.dataset, cache.split, num, cache.resolution, extractor.sha1, cache_dir)
    meta_path = reference_files(stem)[1]
    if meta_path.is_file() and not rebuild:
        try:
            cached = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError):
            cached = None  # damaged: load_reference names the file and the rebuild command
        older = isinstance(cached, dict) and isinstance(cached.get("format", 1), int) and cached.get("format", 1) < REFERENCE_FORMAT
        if not older:  # an older format is rebuilt in place
            return load_reference(stem, expect=request)
    idx = reference_indices(total, num)
    # Important: precision/recall keep at most PR_MAX_FEATURES real features, and caches are written class
    # after class, so they are a seeded random subset of the whole reference, stored in random order
    # (any prefix of them is a uniform subset too).
    pr_order = np.random.default_rng(PR_SUBSET_SEED).permutation(num)[:PR_MAX_FEATURES]
    slot = np.full(num, -1, dtype=np.int64)
    slot[pr_order] = np.arange(len(pr_order))
    stats, kept = FeatureStats(), None
    bs = extractor.batch_size
    for i in maybe_tqdm(range(0, num, bs), progress, desc=f"reference {cache.dataset}:{cache.split}", unit="batch"):
        feats = extractor.features_batch(check_images(cache.images[idx[i : i + bs]], "reference images"))
        stats.update(feats)
        if kept is None:
            kept = np.empty((len(pr_order), feats.shape[1]), dtype=feats.dtype)
        where = slot[i : i + len(feats)]
        kept[where[where >= 0]] = feats[where >= 0]
    manifest = {
        **request,
        "subset_seed": REFERENCE_SUBSET_SEED,
        "pr_subset_seed": PR_SUBSET_SEED,
        "network": extractor.info,
        "feature_dim": stats.dim,
        "full_rank_covariance": stats.full_rank,
        "pr_features": len(pr_order),
        "lddpm_version": __version__,
        "created": now_iso(),
    }
    ref = ReferenceStats(stats.mean, stats.cov, manifest, kept)
    save_reference(stem, ref)
    return ref


def reference_stats(
    dataset: str,
    *,
    split: str = "train",
    num: int | None,
    resolution: int,
    extractor: FeatureExtractor,
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> ReferenceStats:
    """Prepare DATASET:SPLIT at `resolution` (area C's cache) and return its reference statistics."""
    folder = prepare(dataset, resolution=resolution, split=split, root=data_root, cache_dir=cache_dir, progress=progress)
    return reference_from_cache(
        open_cache(folder), num=num, extractor=extractor, path=path, cache_dir=cache_dir, rebuild=rebuild, progress=progress
    )


def reference_size(ref_num: int | None, num: int) -> int | None:
    """Reference size: `num` by default, None (the whole split) for 0."""
    return num if ref_num is None else (ref_num or None)


def load_extractor(
    inception: str | Path | None = None, inception_sha1: str | None = None, *, batch_size: int = 64, device="cpu",
    backend: str = "auto", cache_dir: str | Path | None = None,
) -> FeatureExtractor:
    """The pinned Inception feature extractor, or one from a user file (see `load_inception`); backend auto/torch/onnx."""
    return load_inception(inception, expected_sha1=inception_sha1, batch_size=batch_size, device=device, backend=backend,
                          cache_dir=cache_dir)
