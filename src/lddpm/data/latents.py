"""Latent caches: a prepared dataset encoded once by a trained VAE, for latent diffusion.

Layout of a latent cache folder:
  mean.npy, std.npy  float16 (N, C, h, w): the VAE posterior's mean and standard deviation
  labels.npy         int64 (N,)
  manifest.json      VAE identity, source cache checksum, resolution, latent shape, scaling_factor
Training draws z = mean + std * eps (eps ~ N(0, I) from (seed, step, rank)) and feeds
scaling_factor * z, as in Rombach et al. 2022 (Sec. 4.3.2 / Appendix G).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lddpm import __version__
from lddpm.data import integrity
from lddpm.data.cache import ImageCache, array_checksums, read_manifest
from lddpm.data.loader import EpochSampler, iterate_batches, uint8_to_tensor
from lddpm.errors import LddpmError
from lddpm.io import atomic_dir, reserved_memmap

LATENT_FORMAT = "lddpm-latent-cache"
LATENT_ARRAYS = ("mean.npy", "std.npy", "labels.npy")


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _scaling_factor(vae) -> float | None:
    s = getattr(vae, "scaling_factor", None)
    if s is None:
        return None
    return float(s.item() if torch.is_tensor(s) else s)


class LatentCache:
    """An encoded dataset: `.mean`, `.std` float16 (N,C,h,w) memmaps, `.labels` int64, `.manifest`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest.get("format") != LATENT_FORMAT:
            raise LddpmError(f"{self.path} is not an lddpm latent cache (format {self.manifest.get('format')!r})")
        if "arrays" in self.manifest:  # caches written before array checksums were added have none
            integrity.verify_arrays(self.path, self.manifest, LATENT_ARRAYS, fix=LATENT_FIX.format(path=self.path))
        try:
            self.mean = np.load(self.path / "mean.npy", mmap_mode="r")
            self.std = np.load(self.path / "std.npy", mmap_mode="r")
            self.labels = np.load(self.path / "labels.npy")
        except (OSError, ValueError) as exc:
            raise LddpmError(f"cannot open the arrays of latent cache {self.path}: {exc}; encode it again")
        if self.mean.shape != self.std.shape or self.mean.shape[0] != len(self.labels):
            raise LddpmError(f"latent cache {self.path} arrays disagree in shape; encode it again")
        self.class_names: list[str] = list(self.manifest["class_names"])
        self.num_classes: int = len(self.class_names)
        self.latent_shape: tuple[int, ...] = tuple(self.mean.shape[1:])
        self.scaling_factor: float | None = self.manifest.get("scaling_factor")

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def verify(self) -> None:
        """Hash every byte of the arrays and raise LddpmError if they differ from the manifest."""
        integrity.verify_arrays(self.path, self.manifest, LATENT_ARRAYS, fix=LATENT_FIX.format(path=self.path), full=True)


LATENT_FIX = "delete {path} and run the training again (it encodes the latents anew)"


def open_latent_cache(path: str | os.PathLike) -> LatentCache:
    """Open a folder written by `encode_latents`."""
    return LatentCache(path)


@torch.no_grad()
def encode_latents(
    vae,
    cache: ImageCache | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    vae_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Encode every image of `cache` with `vae.encode(x) -> posterior (.mean, .std)` into `out_dir`.

    Images are fed as float32 NCHW in [-1, 1]. An existing `out_dir` made by the same VAE from the
    same cache is reused; one made otherwise is refused unless `overwrite`. Returns `out_dir`.
    """
    from tqdm import tqdm

    cache = cache if isinstance(cache, ImageCache) else ImageCache(cache)
    out_dir = Path(out_dir)
    vae_id = vae_id or f"sha256:{state_dict_sha256(vae)}"
    request = {"vae_id": vae_id, "source_checksum": cache.checksum}
    if (out_dir / "manifest.json").is_file() and not overwrite:
        old = read_manifest(out_dir)
        diffs = [f"{k}: cached {old.get(k)!r}, requested {v!r}" for k, v in request.items() if old.get(k) != v]
        if diffs:
            raise LddpmError(f"latent cache {out_dir} was made differently ({'; '.join(diffs)}); "
                             "choose another folder, delete it, or pass overwrite=True")
        LatentCache(out_dir)
        return out_dir
    if out_dir.exists() and not (out_dir / "manifest.json").is_file() and any(out_dir.iterdir()):
        raise LddpmError(f"{out_dir} exists and is not a latent cache; choose another folder")

    was_training = getattr(vae, "training", False)
    if hasattr(vae, "eval"):
        vae.eval()
    try:
        with atomic_dir(out_dir) as tmp:
            n = len(cache)
            mean = std = None
            with tqdm(total=n, unit="img", desc="encode", disable=not progress) as bar:
                for i in range(0, n, batch_size):
                    x = uint8_to_tensor(np.asarray(cache.images[i:i + batch_size])).to(device)
                    posterior = vae.encode(x)
                    m, s = posterior.mean.float().cpu().numpy(), posterior.std.float().cpu().numpy()
                    if mean is None:
                        shape = (n,) + m.shape[1:]
                        mean = reserved_memmap(tmp / "mean.npy", np.float16, shape)
                        std = reserved_memmap(tmp / "std.npy", np.float16, shape)
                    m, s = m.astype(np.float16), s.astype(np.float16)
                    if not (np.isfinite(m).all() and np.isfinite(s).all()):
                        raise LddpmError(f"the VAE produced non-finite latents (or beyond float16 range) for images "
                                         f"{i}..{i + len(m) - 1}")
                    mean[i:i + len(m)] = m
                    std[i:i + len(s)] = s
                    bar.update(len(m))
            latent_shape = list(mean.shape[1:])
            mean.flush()
            std.flush()
            del mean, std
            np.save(tmp / "labels.npy", np.asarray(cache.labels, dtype=np.int64))
            arrays, checksum = array_checksums(tmp, LATENT_ARRAYS)
            manifest = {
                "format": LATENT_FORMAT,
                "format_version": 1,
                **request,
                "source_cache": str(cache.path),
                "dataset": cache.dataset,
                "split": cache.split,
                "resolution": cache.resolution,
                "channels": cache.channels,
                "count": n,
                "latent_shape": latent_shape,
                "dtype": "float16",
                "scaling_factor": _scaling_factor(vae),
                "class_names": cache.class_names,
                "arrays": arrays,
                "checksum": checksum,
                "lddpm_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        if was_training and hasattr(vae, "train"):
            vae.train()
    return out_dir


class LatentLoader:
    """Batches of scaled latents: `batch(step) -> (scaling_factor * z float32 (B,C,h,w), y int64 (B,))`.

    Indices follow the same (seed, step, rank) scheme as ImageLoader. With `sample_posterior`,
    z = mean + std * eps where eps comes from a generator seeded by (seed, step, rank); else z = mean.
    """

    def __init__(self, latent_cache: LatentCache | str | os.PathLike, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, scaling_factor: float | None = None,
                 sample_posterior: bool = True):
        self.cache = latent_cache if isinstance(latent_cache, LatentCache) else LatentCache(latent_cache)
        if scaling_factor is None:
            scaling_factor = self.cache.scaling_factor
        if scaling_factor is None:
            raise LddpmError("no scaling_factor: the VAE had none when encoding; pass scaling_factor=")
        self.scaling_factor = float(scaling_factor)
        self.sample_posterior = sample_posterior
        self.sampler = EpochSampler(len(self.cache), batch_size, seed=seed, rank=rank, world_size=world_size)
        self.batch_size = batch_size

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of this rank's part of global batch `step` (as ImageLoader.indices)."""
        return self.sampler.indices(step)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latents float32, labels int64) of this rank's part of global batch `step`."""
        idx = self.sampler.indices(step)
        z = self.cache.mean[idx].astype(np.float32)
        if self.sample_posterior:
            rng = np.random.default_rng([self.sampler.seed, step, self.sampler.rank, 2])
            z += self.cache.std[idx].astype(np.float32) * rng.standard_normal(z.shape, dtype=np.float32)
        z *= self.scaling_factor
        return torch.from_numpy(z), torch.from_numpy(self.cache.labels[idx])

    def iter_from(self, step: int = 0, *, prefetch: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batch(step), batch(step + 1), ... forever."""
        return iterate_batches(self.batch, step, prefetch)
