"""Sample N images from a checkpoint, score them (FID, precision/recall, class metrics), and time them.

`evaluate_generated` scores any uint8 images against cached reference statistics;
`evaluate_checkpoint` samples through `lddpm.pipeline.load_pipeline` in resumable batches and adds
the sampling cost; `evaluate_vae` scores VAE reconstructions of a test split. See docs/evaluation.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from lddpm import __version__
from lddpm.errors import LddpmError
from lddpm.metrics import (
    FeatureExtractor,
    FeatureStats,
    ReferenceStats,
    check_images,
    class_accuracy,
    class_probabilities,
    frechet_distance,
    inception_score,
    load_classifier,
    load_inception,
    load_is_network,
    load_reference,
    network_probabilities,
    precision_recall,
    save_reference,
)
from lddpm.metrics.classifier import default_classifier_dir
from lddpm.metrics.fid import default_reference_path, reference_files

PR_MAX_FEATURES = 10_000  # real features kept in a reference for precision/recall
REFERENCE_SUBSET_SEED = 0

# (images uint8 (n,H,W,C), labels or None) from (n, labels for the batch or None, seed)
GenerateBatch = Callable[[int, "np.ndarray | None", int], "tuple[np.ndarray, np.ndarray | None]"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _tqdm(iterable, progress: bool, **kwargs):
    if not progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, **kwargs)


# ----------------------------------------------------------------------------- reference statistics


def parse_reference(spec: str) -> tuple[str, str]:
    """'DATASET:SPLIT' (or 'DATASET', split train) -> (dataset, split)."""
    dataset, _, split = spec.partition(":")
    if not dataset:
        raise LddpmError(f"--reference must look like DATASET:SPLIT (e.g. fashion-mnist:train), got {spec!r}")
    return dataset, split or "train"


def reference_indices(total: int, num: int, seed: int = REFERENCE_SUBSET_SEED) -> np.ndarray:
    """The sorted random subset of `num` of `total` images used for a reference (all if num == total)."""
    if num == total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:num])


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
        "dataset": cache.dataset,
        "split": cache.split,
        "num": num,
        "resolution": int(cache.resolution),
        "network_sha1": extractor.sha1,
        "dataset_checksum": cache.checksum,
    }
    stem = Path(path) if path else default_reference_path(cache.dataset, cache.split, num, cache.resolution, extractor.sha1, cache_dir)
    if reference_files(stem)[1].is_file() and not rebuild:
        return load_reference(stem, expect=request)
    idx = reference_indices(total, num)
    stats, kept = FeatureStats(), []
    bs = extractor.batch_size
    for i in _tqdm(range(0, num, bs), progress, desc=f"reference {cache.dataset}:{cache.split}", unit="batch"):
        feats = extractor.features_batch(check_images(cache.images[idx[i : i + bs]], "reference images"))
        stats.update(feats)
        if i < PR_MAX_FEATURES:
            kept.append(feats[: PR_MAX_FEATURES - i])
    manifest = {
        **request,
        "subset_seed": REFERENCE_SUBSET_SEED,
        "network": extractor.info,
        "feature_dim": stats.dim,
        "full_rank_covariance": stats.full_rank,
        "pr_features": int(sum(len(k) for k in kept)),
        "lddpm_version": __version__,
        "created": _now(),
    }
    ref = ReferenceStats(stats.mean, stats.cov, manifest, np.concatenate(kept))
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
    from lddpm.data import open_cache, prepare

    folder = prepare(dataset, resolution=resolution, split=split, root=data_root, cache_dir=cache_dir, progress=progress)
    return reference_from_cache(
        open_cache(folder), num=num, extractor=extractor, path=path, cache_dir=cache_dir, rebuild=rebuild, progress=progress
    )


# ----------------------------------------------------------------------------- scoring


def evaluate_generated(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    reference_stats: ReferenceStats,
    extractor: FeatureExtractor,
    classifier: nn.Module | None = None,
    classifier_meta: dict | None = None,
    is_network: nn.Module | None = None,
    is_network_info: dict | None = None,
    pr_k: int = 3,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Score uint8 (N, H, W, C) images: FID, precision/recall, classifier score and class accuracy, and IS.

    FID is against `reference_stats` (Eq. 6 of Heusel et al. 2017). With N <= feature dim the
    covariance is rank-deficient: a warning, and `full_rank_covariance: false` in the result.
    """
    images = check_images(images, "generated images")
    n, h, w, c = images.shape
    ref_res = reference_stats.manifest.get("resolution")
    if ref_res is not None and (h, w) != (ref_res, ref_res):
        raise LddpmError(
            f"generated images are {h}x{w} but the reference statistics were built at {ref_res}x{ref_res}; "
            "build a reference at the images' resolution"
        )
    ref_sha = reference_stats.manifest.get("network_sha1")
    if ref_sha is not None and extractor.sha1 is not None and ref_sha != extractor.sha1:
        raise LddpmError(
            f"the reference statistics were made with feature network sha1 {ref_sha}, but this evaluation uses "
            f"{extractor.sha1}; rebuild the reference with the same network"
        )
    feats = extractor.features(images, progress=progress, desc="FID features")
    stats = FeatureStats().update(feats)
    if not stats.full_rank:
        warnings.warn(
            f"FID with N={n} images <= feature dimension {stats.dim}: the covariance is not full rank; "
            "the value is biased (compare FIDs only at equal N)",
            stacklevel=2,
        )
    out: dict = {
        "num_images": n,
        "resolution": h,
        "channels": c,
        "fid": frechet_distance(stats.mean, stats.cov, reference_stats.mu, reference_stats.sigma),
        "full_rank_covariance": stats.full_rank,
        "feature_dim": stats.dim,
        "feature_network": extractor.info,
        "reference": {k: v for k, v in reference_stats.manifest.items() if k not in ("network",)},
    }
    real = reference_stats.features
    if real is not None and len(real) > pr_k and n > pr_k:
        m = min(len(real), n)
        pr = precision_recall(real[:m], feats[:m], k=pr_k)
        out.update(precision=pr["precision"], recall=pr["recall"], pr_k=pr_k, pr_num=m)
    else:
        out.update(precision=None, recall=None)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (n,):
            raise LddpmError(f"labels must have shape ({n},), got {labels.shape}")
    out.update(classifier_score=None, class_accuracy=None, classifier=None)
    if classifier is not None:
        probs = class_probabilities(classifier, images, device=device, progress=progress)
        out["classifier_score"] = inception_score(probs)[0]
        if labels is not None:
            out["class_accuracy"] = class_accuracy(probs, labels)
        out["classifier"] = dict(classifier_meta or {})
    out.update(inception_score=None, inception_score_std=None, is_network=None)
    if is_network is not None:
        probs = network_probabilities(is_network, images, device=device, progress=progress)
        splits = 10 if n >= 100 else 1  # the customary 10 splits (Salimans et al. 2016)
        out["inception_score"], out["inception_score_std"] = inception_score(probs, splits)
        out["is_network"] = {**(is_network_info or {}), "splits": splits}
    return out


# ----------------------------------------------------------------------------- sampling with resume and cost


def balanced_labels(num: int, num_classes: int) -> np.ndarray:
    """Labels 0..C-1 repeated (N/C per class, the remainder to the first classes), interleaved so every batch is balanced."""
    if num_classes < 1:
        raise LddpmError("balanced labels need a class-conditional model (num_classes >= 1)")
    return np.arange(num, dtype=np.int64) % num_classes


def batch_seed(seed: int, index: int) -> int:
    """A distinct 31-bit seed for batch `index` of a run with base `seed` (resume draws the same noise)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


class ForwardCounter:
    """Counts forward calls of a module and the rows (images) they process, through a forward pre-hook."""

    def __init__(self, module: nn.Module | None):
        self.calls = 0
        self.rows = 0
        self._handle = None if module is None else module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        self.calls += 1
        self.rows += int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim > 0 else 1

    def close(self) -> None:
        """Remove the hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def find_denoiser(pipeline) -> nn.Module | None:
    """The pipeline's noise-prediction network (first nn.Module among common attribute names), or None."""
    for name in ("model", "ema_model", "denoiser", "network", "net", "unet"):
        obj = getattr(pipeline, name, None)
        if isinstance(obj, nn.Module):
            return obj
    return None


def peak_memory(device: str | torch.device) -> dict:
    """Peak CUDA memory allocated since the last reset, or the process's peak RSS on CPU, in MiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda_max_allocated"}
    try:
        import resource
    except ImportError:  # Windows
        return {"peak_memory_mib": None, "peak_memory_kind": None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
    return {"peak_memory_mib": rss_mib, "peak_memory_kind": "process_max_rss"}


def generate_resumable(
    generate_batch: GenerateBatch,
    num: int,
    *,
    batch_size: int,
    labels: np.ndarray | None = None,
    seed: int = 0,
    partial_dir: str | Path | None = None,
    settings: dict | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Generate `num` images in batches, saving each to `partial_dir/batch-XXXXX.npz`; existing batches are reused.

    Batch i uses seed `batch_seed(seed, i)`, so a resumed run gives the same images. `settings` are
    stored beside the batches and must match on resume. Returns (images, labels, timing), where the
    timing covers the batches generated now, the first one excluded as warm-up when there are more.
    """
    if num < 1 or batch_size < 1:
        raise LddpmError(f"--num and --batch-size must be positive, got {num} and {batch_size}")
    if labels is not None and len(labels) != num:
        raise LddpmError(f"{len(labels)} labels for {num} images")
    folder = Path(partial_dir) if partial_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "settings.json"
        want = json.loads(json.dumps(settings or {}))
        if meta.is_file():
            have = json.loads(meta.read_text())
            if have != want:
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                raise LddpmError(
                    f"partial samples in {str(folder)!r} were made with other settings ({', '.join(diff)}); "
                    "delete that folder or write the results elsewhere (--out)"
                )
        else:
            meta.write_text(json.dumps(want, indent=2, sort_keys=True) + "\n")
    images, out_labels, times, resumed = [], [], [], 0
    starts = list(range(0, num, batch_size))
    for index, start in enumerate(_tqdm(starts, progress, desc="sampling", unit="batch")):
        n = min(batch_size, num - start)
        path = folder / f"batch-{index:05d}.npz" if folder is not None else None
        if path is not None and path.is_file():
            with np.load(path) as data:
                x = data["images"]
                y = data["labels"] if "labels" in data else None
            if len(x) == n:
                images.append(x)
                out_labels.append(y)
                resumed += n
                continue
        batch_labels = None if labels is None else labels[start : start + n]
        t0 = time.perf_counter()
        x, y = generate_batch(n, batch_labels, batch_seed(seed, index))
        times.append((n, time.perf_counter() - t0))
        x = check_images(x, "generated images")
        if len(x) != n:
            raise LddpmError(f"the generator returned {len(x)} images for a batch of {n}")
        y = batch_labels if y is None else np.asarray(y, dtype=np.int64)
        if path is not None:
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, images=x, **({} if y is None else {"labels": y}))
            tmp.replace(path)
        images.append(x)
        out_labels.append(y)
    timed = times[1:] if len(times) > 1 else times
    timed_images, timed_seconds = sum(t[0] for t in timed), sum(t[1] for t in timed)
    timing = {
        "num_generated_now": sum(t[0] for t in times),
        "num_resumed": resumed,
        "num_timed_images": timed_images,
        "timing_excludes_warmup": len(times) > 1,
        "seconds_per_image": timed_seconds / timed_images if timed_images else None,
        "images_per_second": timed_images / timed_seconds if timed_seconds > 0 else None,
        "sampling_seconds_total": sum(t[1] for t in times),
    }
    all_labels = None if any(y is None for y in out_labels) else np.concatenate(out_labels)
    return np.concatenate(images), all_labels, timing


# ----------------------------------------------------------------------------- loading helpers


def load_images(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images made elsewhere: an .npz with `images` uint8 (N,H,W,C) [and `labels`], or a folder of PNG files."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            if "images" not in data:
                raise LddpmError(f"{str(path)!r} has no `images` array (found: {', '.join(data.files)})")
            labels = data["labels"].astype(np.int64) if "labels" in data else None
            return check_images(data["images"], f"images in {path.name}"), labels
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise LddpmError(f"no .png files in {str(path)!r}")
        arrays = []
        for f in files:
            with Image.open(f) as img:
                arrays.append(np.asarray(img.convert("L" if img.mode in ("L", "I", "I;16", "1") else "RGB")))
        if len({a.shape for a in arrays}) != 1:
            raise LddpmError(f"the PNG files in {str(path)!r} differ in size or channels; all must match")
        return check_images(np.stack(arrays), f"images in {path}"), None
    raise LddpmError(f"--images must be a folder of PNG files or an .npz file, got {str(path)!r}")


def load_extractor(
    inception: str | Path | None = None, inception_sha1: str | None = None, *, batch_size: int = 64, device="cpu",
    backend: str = "auto", cache_dir: str | Path | None = None,
) -> FeatureExtractor:
    """The pinned Inception feature extractor, or one from a user file (see `load_inception`); backend auto/torch/onnx."""
    return load_inception(inception, expected_sha1=inception_sha1, batch_size=batch_size, device=device, backend=backend,
                          cache_dir=cache_dir)


def resolve_classifier(
    classifier: str | Path | None, dataset: str | None, resolution: int, *, cache_dir=None, device="cpu"
) -> tuple[nn.Module | None, dict | None, str | None]:
    """classifier 'auto' (the default folder if it exists), a folder, or None/'none' -> (model, meta, note)."""
    if classifier in (None, "none"):
        return None, None, None
    if classifier == "auto":
        if dataset is None:
            return None, None, "no classifier: dataset unknown"
        folder = default_classifier_dir(dataset, resolution, cache_dir)
        if not folder.is_dir():
            return None, None, f"no classifier metrics: run `lddpm train-classifier {dataset} --resolution {resolution}`"
    else:
        folder = Path(classifier)
    model, meta = load_classifier(folder, device)
    if meta.get("resolution") not in (None, resolution):
        raise LddpmError(
            f"classifier {str(folder)!r} was trained at {meta['resolution']}px, the images are {resolution}px; "
            f"train one with `lddpm train-classifier {meta.get('dataset', 'DATASET')} --resolution {resolution}`"
        )
    return model, {**meta, "path": str(folder)}, None


def reference_size(ref_num: int | None, num: int) -> int | None:
    """Reference size: `num` by default, None (the whole split) for 0."""
    return num if ref_num is None else (ref_num or None)


def _is_network(path, sha1, device):
    if path is None:
        return None, None
    net, digest = load_is_network(path, sha1)
    return net.to(device), {"path": str(path), "sha1": digest}


# ----------------------------------------------------------------------------- top-level evaluations


def evaluate_checkpoint(
    path: str | Path,
    *,
    num: int,
    sampler: str = "ddim",
    num_steps: int | None = 50,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    labels: str = "balanced",
    reference: str | ReferenceStats | None = None,
    ref_num: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    partial_dir: str | Path | None = None,
    extractor: FeatureExtractor | None = None,
    inception: str | Path | None = None,
    inception_sha1: str | None = None,
    classifier: str | Path | None = "auto",
    is_network: str | Path | None = None,
    is_network_sha1: str | None = None,
    cache_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    pipeline=None,
    progress: bool = True,
) -> dict:
    """Sample `num` images from a run or checkpoint (resumable), score them and measure the sampling cost.

    `pipeline` may be given directly (anything with `.generate`, `.num_classes`, `.resolution`,
    `.dataset`); otherwise `lddpm.pipeline.load_pipeline(path, device)` is used.
    """
    if pipeline is None:
        from lddpm.pipeline import load_pipeline

        pipeline = load_pipeline(path, device=device)
    num_classes = int(getattr(pipeline, "num_classes", 0) or 0)
    if labels not in ("balanced", "none"):
        raise LddpmError(f"--labels must be 'balanced' or 'none', got {labels!r}")
    want_labels = balanced_labels(num, num_classes) if (num_classes and labels == "balanced") else None
    # a conditional model sampled without labels gets the null label (unconditional samples)
    gen_labels = np.full(num, num_classes, np.int64) if (num_classes and want_labels is None) else want_labels
    if guidance_scale != 1.0 and want_labels is None:
        raise LddpmError(f"--guidance-scale {guidance_scale} needs a class-conditional model sampled with --labels balanced")
    resolution = int(pipeline.resolution)
    dataset = getattr(pipeline, "dataset", None)
    extractor = extractor or load_extractor(inception, inception_sha1, batch_size=batch_size, device=device)
    if not isinstance(reference, ReferenceStats):
        ref_dataset, ref_split = parse_reference(reference or f"{dataset}:train")
        if ref_dataset in (None, "None"):
            raise LddpmError("the checkpoint does not name its dataset; pass --reference DATASET:SPLIT")
        reference = reference_stats(
            ref_dataset, split=ref_split, num=reference_size(ref_num, num), resolution=resolution, extractor=extractor,
            cache_dir=cache_dir, data_root=data_root, progress=progress,
        )
    settings = {
        "checkpoint": str(path),
        "num": num,
        "sampler": sampler,
        "num_steps": num_steps,
        "eta": eta,
        "guidance_scale": guidance_scale,
        "labels": "balanced" if want_labels is not None else "none",
        "seed": seed,
        "batch_size": batch_size,
    }
    denoiser = find_denoiser(pipeline)
    counter = ForwardCounter(denoiser)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def generate_batch(n, batch_labels, batch_seed_):
        return pipeline.generate(
            n, sampler=sampler, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale,
            labels=batch_labels, seed=batch_seed_, batch_size=n, progress=False,
        )

    try:
        images, out_labels, timing = generate_resumable(
            generate_batch, num, batch_size=batch_size, labels=gen_labels, seed=seed,
            partial_dir=partial_dir, settings=settings, progress=progress,
        )
    finally:
        counter.close()
    cost = {**timing, **peak_memory(device), "device": str(device)}
    generated = timing["num_generated_now"]
    if denoiser is not None and generated:
        batches = -(-generated // batch_size)
        cost.update(
            model_calls=counter.calls,
            model_calls_per_batch=counter.calls / batches,  # the sampler's NFE
            network_evaluations_per_image=counter.rows / generated,  # CFG doubles this
            network_evaluations_per_image_step=counter.rows / generated / num_steps if num_steps else None,
        )
    else:
        cost.update(model_calls=None, model_calls_per_batch=None, network_evaluations_per_image=None,
                    network_evaluations_per_image_step=None)
    clf, clf_meta, note = resolve_classifier(classifier, dataset, resolution, cache_dir=cache_dir, device=device)
    is_net, is_info = _is_network(is_network, is_network_sha1, device)
    metrics = evaluate_generated(
        images, out_labels if want_labels is not None else None, reference_stats=reference, extractor=extractor,
        classifier=clf, classifier_meta=clf_meta, is_network=is_net, is_network_info=is_info, device=device,
        progress=progress,
    )
    return {"kind": "samples", **metrics, "cost": cost, "settings": settings, "notes": [note] if note else [],
            "lddpm_version": __version__, "created": _now()}


def evaluate_image_files(
    images_path: str | Path,
    *,
    reference: str | ReferenceStats,
    ref_num: int | None = None,
    extractor: FeatureExtractor | None = None,
    classifier: str | Path | None = "auto",
    is_network: str | Path | None = None,
    is_network_sha1: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    cache_dir=None,
    data_root=None,
    progress: bool = True,
) -> dict:
    """Score images made elsewhere (PNG folder or npz) against DATASET:SPLIT at the images' resolution."""
    images, labels = load_images(images_path)
    resolution = images.shape[1]
    extractor = extractor or load_extractor(batch_size=batch_size, device=device)
    dataset = None
    if not isinstance(reference, ReferenceStats):
        dataset, split = parse_reference(reference)
        reference = reference_stats(dataset, split=split, num=reference_size(ref_num, len(images)), resolution=resolution,
                                    extractor=extractor, cache_dir=cache_dir, data_root=data_root, progress=progress)
    clf, clf_meta, note = resolve_classifier(classifier, dataset, resolution, cache_dir=cache_dir, device=device)
    is_net, is_info = _is_network(is_network, is_network_sha1, device)
    metrics = evaluate_generated(images, labels, reference_stats=reference, extractor=extractor, classifier=clf,
                                 classifier_meta=clf_meta, is_network=is_net, is_network_info=is_info,
                                 device=device, progress=progress)
    return {"kind": "images", **metrics, "settings": {"images": str(images_path), "num": len(images)},
            "notes": [note] if note else [], "lddpm_version": __version__, "created": _now()}


@torch.inference_mode()
def vae_reconstructions(vae: nn.Module, images: np.ndarray, *, batch_size: int = 64, device="cpu", progress=False) -> np.ndarray:
    """uint8 reconstructions decode(encode(x).mode()), clamped to [-1, 1], of uint8 (N, H, W, C) images."""
    out = []
    vae = vae.to(device).eval()
    for i in _tqdm(range(0, len(images), batch_size), progress, desc="VAE reconstructions", unit="batch"):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        out.append(((recon + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def evaluate_vae(
    vae: nn.Module,
    cache,
    *,
    reference_stats: ReferenceStats,
    extractor: FeatureExtractor,
    num: int | None = None,
    batch_size: int = 64,
    device="cpu",
    progress: bool = False,
) -> dict:
    """Reconstruct the first `num` images of `cache` (a test split) and score them: FID vs the reference, MSE, PSNR.

    MSE and PSNR are on [0, 1] pixels (PSNR = 10 log10(1 / MSE) per image, then averaged), from
    the uint8 reconstructions that FID sees.
    """
    num = min(int(num or len(cache)), len(cache))
    originals = check_images(np.asarray(cache.images[:num]), "test images")
    recon = vae_reconstructions(vae, originals, batch_size=batch_size, device=device, progress=progress)
    if recon.shape != originals.shape:
        raise LddpmError(f"the VAE returned reconstructions of shape {recon.shape} for images {originals.shape}")
    err = ((recon.astype(np.float64) - originals.astype(np.float64)) / 255.0) ** 2
    mse_per_image = err.reshape(num, -1).mean(axis=1)
    psnr = 10 * np.log10(1.0 / np.maximum(mse_per_image, 1e-12))
    metrics = evaluate_generated(recon, None, reference_stats=reference_stats, extractor=extractor, device=device,
                                 progress=progress)
    return {
        "kind": "vae",
        **metrics,
        "mse": float(mse_per_image.mean()),
        "psnr": float(psnr.mean()),
        "source": {"dataset": getattr(cache, "dataset", None), "split": getattr(cache, "split", None), "num": num},
        "lddpm_version": __version__,
        "created": _now(),
    }


def summary_line(result: dict) -> str:
    """One line with the headline numbers of an evaluation result."""
    ref = result.get("reference", {})
    parts = [f"FID {result['fid']:.2f} (N={result['num_images']} vs {ref.get('dataset')}:{ref.get('split')} N={ref.get('num')})"]
    if result.get("precision") is not None:
        parts.append(f"precision {result['precision']:.3f} recall {result['recall']:.3f}")
    if result.get("classifier_score") is not None:
        parts.append(f"classifier score {result['classifier_score']:.2f}")
    if result.get("class_accuracy") is not None:
        parts.append(f"class accuracy {result['class_accuracy']:.3f}")
    if result.get("inception_score") is not None:
        parts.append(f"IS {result['inception_score']:.2f}")
    if "psnr" in result:
        parts.append(f"PSNR {result['psnr']:.2f} dB MSE {result['mse']:.5f}")
    cost = result.get("cost") or {}
    if cost.get("seconds_per_image") is not None:
        parts.append(f"{cost['seconds_per_image']:.3f} s/image ({cost['images_per_second']:.2f} img/s)")
    if cost.get("model_calls_per_batch") is not None:
        parts.append(f"NFE {cost['model_calls_per_batch']:.0f} ({cost['network_evaluations_per_image']:.0f} net evals/image)")
    if cost.get("peak_memory_mib") is not None:
        parts.append(f"peak {cost['peak_memory_mib']:.0f} MiB")
    if not result.get("full_rank_covariance", True):
        parts.append(f"[N <= {result.get('feature_dim')}: rank-deficient covariance]")
    return " | ".join(parts)


def write_result(result: dict, out: str | Path) -> Path:
    """Write an evaluation result as indented JSON (atomically)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    tmp.replace(out)
    return out


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
