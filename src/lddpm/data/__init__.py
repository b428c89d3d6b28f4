"""Datasets, preprocessing into uint8 caches, loaders and latent caches.

`prepare(name, resolution=..., split=...)` reads a dataset in its standard format, preprocesses it
once and writes a cache folder; `open_cache` / `ImageLoader` read it back for training;
`encode_latents` / `LatentLoader` do the same for a VAE's latents. A "captioned" dataset's cache
also holds a `CaptionTable` (`open_cache(path).captions`); `read_captioned` reads its formats.
"""

from lddpm.data.cache import (
    CAPTIONED_DATASETS,
    DATASETS,
    ImageCache,
    cache_name,
    dataset_info,
    default_cache_dir,
    open_cache,
    prepare,
    read_manifest,
    test_split,
)
from lddpm.data.captions import CaptionTable, read_captioned
from lddpm.data.download import download_file
from lddpm.data.latents import LatentCache, LatentLoader, encode_latents, open_latent_cache
from lddpm.data.loader import EpochSampler, ImageLoader
from lddpm.data.readers import imagenet100_classes

__all__ = [
    "CaptionTable",
    "CAPTIONED_DATASETS",
    "DATASETS",
    "EpochSampler",
    "ImageCache",
    "ImageLoader",
    "LatentCache",
    "LatentLoader",
    "cache_name",
    "dataset_info",
    "default_cache_dir",
    "download_file",
    "encode_latents",
    "imagenet100_classes",
    "open_cache",
    "open_latent_cache",
    "prepare",
    "read_captioned",
    "read_manifest",
    "test_split",
]
