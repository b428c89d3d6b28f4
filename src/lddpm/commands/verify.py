"""`lddpm verify-cache PATH...`: hash every byte of prepared (or latent) caches against their manifests."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add `verify-cache` to the `lddpm` parser."""
    p = subparsers.add_parser(
        "verify-cache",
        help="check every byte of cache folders against their manifests",
        description="Recompute the sha256 of each array of an image cache (from `lddpm prepare`) or a latent "
        "cache and compare with the manifest. Every open already checks sizes and a sample of blocks (all "
        "bytes for files under 64 MiB); this checks all bytes. Exit status 2 names the first damaged file.",
    )
    p.add_argument("paths", nargs="+", metavar="CACHE_DIR", help="cache folders (with manifest.json)")
    p.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    """Verify each folder fully; print one line per good cache."""
    from lddpm.data.cache import CACHE_FORMAT, ImageCache, read_manifest
    from lddpm.data.latents import LATENT_FORMAT, LatentCache
    from lddpm.errors import LddpmError

    for path in args.paths:
        kind = read_manifest(path).get("format")
        if kind == CACHE_FORMAT:
            cache = ImageCache(path)
        elif kind == LATENT_FORMAT:
            cache = LatentCache(path)
            if "arrays" not in cache.manifest:
                raise LddpmError(f"latent cache {path} predates array checksums and cannot be verified; "
                                 "delete it and run the training again (it encodes the latents anew)")
        else:
            raise LddpmError(f"{path} is not an lddpm cache (manifest format {kind!r})")
        cache.verify()
        print(f"ok {path}: {len(cache)} items, every byte matches the manifest")
    return 0
