"""`lddpm prepare`: preprocess a dataset once into a cached uint8 array folder."""

from __future__ import annotations

import argparse

from lddpm.datasets import DATASETS


def register(subparsers) -> None:
    """Add `prepare` to the `lddpm` parser."""
    p = subparsers.add_parser(
        "prepare",
        help="read a dataset, preprocess it once and cache it as uint8 arrays",
        description=(
            "Read a dataset in its standard format, apply the standard preprocessing (resize the "
            "shorter side and centre-crop; Fashion-MNIST/MNIST 28->32 by zero padding) and write "
            "images.npy, labels.npy and manifest.json under the cache dir. Reuses a matching cache. "
            "Captioned data (`captioned`: metadata.jsonl/.csv, .txt/.caption files, WebDataset shards, COCO "
            "captions; `fashion-text` / `fashion-pairs`: the text benchmark scenes rendered from Fashion-MNIST) "
            "also get a caption table."
        ),
    )
    p.add_argument("dataset", choices=DATASETS, help="dataset name")
    p.add_argument("--resolution", type=int, default=None,
                   help="output size in pixels (default: 32 for the 28/32-pixel sets, 128 for imagenet100, 64 for imagefolder)")
    p.add_argument("--split", default="train", help="train, test (val for imagenet100; any subfolder for imagefolder)")
    p.add_argument("--root", default=None,
                   help="folder with the source files (default for fashion-mnist: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $LDDPM_CACHE or ~/.cache/lddpm)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes for image folders (default: CPU count, at most 8)")
    p.add_argument("--caption-column", default="text",
                   help="captioned: the caption column of metadata.jsonl / .csv (default text)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted in the manifest) instead of failing")
    p.add_argument("--download", action="store_true", help="cifar10/cifar100: fetch the official archive and check its MD5")
    p.add_argument("--fit", choices=("pad", "resize"), default=None,
                   help="28-pixel sets: zero-pad (default) or resize to the resolution")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if a cache exists (the old one stays until the new one is complete)")
    p.add_argument("--verify", action="store_true",
                   help="hash every byte of the (new or reused) cache against its manifest (see also `lddpm verify-cache`)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    """Run `lddpm prepare` and print a summary of the cache."""
    from lddpm import checks
    from lddpm.data import open_cache, prepare

    if args.resolution is not None:
        checks.resolution("--resolution", args.resolution)
    if args.workers is not None:
        checks.int_in_range("--workers", args.workers, 1, 256)

    folder = prepare(
        args.dataset, resolution=args.resolution, split=args.split, root=args.root,
        cache_dir=args.cache_dir, workers=args.workers, skip_bad=args.skip_bad,
        download=args.download, fit=args.fit, overwrite=args.overwrite, progress=not args.quiet,
        caption_column=args.caption_column,
    )
    cache = open_cache(folder)
    if args.verify:
        cache.verify()
    m = cache.manifest
    print(f"{folder}")
    print(f"  {m['dataset']} {m['split']}: {len(cache)} images, {cache.resolution}x{cache.resolution}x{cache.channels} uint8, "
          f"{cache.num_classes} classes, fit={m['preprocessing']['fit']}")
    if cache.captions is not None:
        print(f"  {len(cache.captions.texts) - 1} distinct captions (caption table with the null prompt \"\" first)")
    if m["skipped"]["count"]:
        print(f"  skipped {m['skipped']['count']} unreadable image(s) (listed in manifest.json)")
    return 0
