"""Prepared uint8 caches: `prepare` writes images.npy / labels.npy / manifest.json once, atomically.

Layout of one cache folder `<cache_dir>/<dataset>-<split>-<resolution>[-<fit>]`:
  images.npy     uint8 (N, R, R, C), NHWC, memory-mappable
  labels.npy     int64 (N,)
  manifest.json  request, sources, preprocessing, counts, class names, array checksums, version
A captioned dataset's cache also holds its caption table (lddpm.data.captions.CaptionTable):
  captions.json        JSON list of the distinct captions, index 0 = "" (the null prompt)
  caption_offsets.npy  int64 (N + 1,): image i's captions are caption_indices[offsets[i]:offsets[i + 1]]
  caption_indices.npy  int64 (M,): indices into captions.json
with records in the manifest's `arrays` and in its `checksum`, like images.npy and labels.npy.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lddpm import __version__
from lddpm.data import captions as captions_mod
from lddpm.data import preprocess, readers
from lddpm.data.download import download_file
from lddpm.errors import LddpmError
from lddpm.checks import resolution as check_resolution
from lddpm.checks import strict
from lddpm.data import integrity
from lddpm.datasets import DATASETS
from lddpm.io import make_temp_dir, os_error, remove_stale_temp_files, reserved_memmap, swap_in_dir

SPLITS = {
    "fashion-mnist": ("train", "test"), "mnist": ("train", "test"), "cifar10": ("train", "test"),
    "cifar100": ("train", "test"), "imagenet100": ("train", "val"), "imagefolder": None, "captioned": None,
    "fashion-text": ("train", "test"), "fashion-pairs": ("train", "test"),
}
# Datasets whose caches hold captions (a caption table). fashion-text / fashion-pairs are the text
# benchmark sets rendered from the real Fashion-MNIST (lddpm.data.scenes); their root is Fashion-MNIST's.
CAPTIONED_DATASETS = ("captioned", "fashion-text", "fashion-pairs")
ROOT_DATASETS = ("imagefolder", "captioned")  # named by their --root; it is required
NATIVE_SIZE = {"fashion-mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32}
FITS = ("pad", "resize")
CACHE_FORMAT = "lddpm-image-cache"
CACHE_FORMAT_VERSION = 1
IMAGE_ARRAYS = ("images.npy", "labels.npy")


def default_cache_dir() -> Path:
    """`$LDDPM_CACHE`, or `~/.cache/lddpm`."""
    return Path(os.environ.get("LDDPM_CACHE") or Path.home() / ".cache" / "lddpm").expanduser()


def check_dataset(name: str) -> str:
    """Return `name` if it is a known dataset, else raise LddpmError listing the choices."""
    if name not in DATASETS:
        raise LddpmError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return name


def dataset_info(name: str, root: str | os.PathLike | None = None) -> tuple[int, int, int | None, list[str] | None]:
    """(channels, default_resolution, num_classes, class_names) of a dataset, without reading images.

    For "imagefolder" the classes come from the subfolders of `root` (None when no root is given).
    A "captioned" dataset has no classes; its channels (3 here) become 1 if every image is grey.
    """
    check_dataset(name)
    if name in ("fashion-mnist", "mnist"):
        names = readers.FASHION_MNIST_CLASSES if name == "fashion-mnist" else readers.MNIST_CLASSES
        return 1, 32, 10, list(names)
    if name == "cifar10":
        return 3, 32, 10, list(readers.CIFAR10_CLASSES)
    if name == "cifar100":
        return 3, 32, 100, list(readers.CIFAR100_CLASSES)
    if name == "imagenet100":
        return 3, 128, 100, readers.imagenet100_classes()
    if name == "captioned":
        return 3, 64, 0, []
    if name in ("fashion-text", "fashion-pairs"):
        return 1, 32, 0, []
    if root is None:
        return 3, 64, None, None
    base = Path(root) / "train" if (Path(root) / "train").is_dir() else Path(root)
    names = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) if base.is_dir() else []
    return 3, 64, len(names), names


def default_fit(name: str, resolution: int) -> str:
    """Zero padding for the 28x28 sets when the resolution is larger (28 -> 32), else resize + crop."""
    return "pad" if name in ("fashion-mnist", "mnist") and resolution >= 28 else "resize"


def test_split(dataset: str) -> str:
    """The held-out split of a dataset: `val` for ImageNet-100, else `test`."""
    return "val" if dataset == "imagenet100" else "test"


def cache_name(name: str, split: str, resolution: int, fit: str, root: str | os.PathLike | None = None) -> str:
    """The cache folder name for a request: `<dataset>[-<root name>]-<split>-<resolution>[-<fit>]`."""
    parts = [name]
    if name in ROOT_DATASETS and root is not None:
        parts.append(re.sub(r"[^A-Za-z0-9_.]+", "_", Path(root).resolve().name) or "root")
    parts += [split, str(resolution)]
    if fit != default_fit(name, resolution):
        parts.append(fit)
    return "-".join(parts)


# ---------------------------------------------------------------------------------------------
# Reading an existing cache


def read_manifest(folder: str | os.PathLike) -> dict:
    """Load `folder/manifest.json`; LddpmError if it is missing or not valid JSON."""
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise LddpmError(f"{folder} is not a prepared cache (no manifest.json); run `lddpm prepare` first")
    except (OSError, ValueError) as exc:
        raise LddpmError(f"cannot read {path}: {exc}; delete the folder and prepare it again")
    if not isinstance(manifest, dict):
        raise LddpmError(f"{path} is not a manifest object; delete the folder and prepare it again")
    return strict(manifest, str(path), "manifest")


def array_checksums(folder: Path, names: tuple[str, ...]) -> tuple[dict, str]:
    arrays = {}
    for n in names:
        arr = np.load(folder / n, mmap_mode="r")
        arrays[n] = integrity.array_record(folder / n, arr.shape, arr.dtype)
    return arrays, integrity.combined_checksum(arrays, names)


def rebuild_hint(manifest: dict) -> str:
    """How to rebuild a damaged cache: the `lddpm prepare ... --overwrite` command for its request."""
    request = manifest.get("request") if isinstance(manifest.get("request"), dict) else {}
    parts = ["lddpm prepare", str(request.get("dataset", manifest.get("dataset", "DATASET")))]
    for key in ("split", "resolution", "fit", "root", "caption_column"):
        if request.get(key) is not None:
            parts.append(f"--{key.replace('_', '-')} {request[key]}")
    return f"rebuild it with `{' '.join(parts)} --overwrite` (add your --cache-dir), or delete the folder"


def cache_files(manifest: dict) -> tuple[str, ...]:
    """The checksummed files of an image cache: images, labels, and the caption table if it has one."""
    return IMAGE_ARRAYS + (captions_mod.CAPTION_FILES if "captions" in manifest else ())


class ImageCache:
    """A prepared dataset: `.images` uint8 (N,H,W,C) memmap, `.labels` int64 (N,), plus its manifest;
    `.captions`: the CaptionTable of a captioned dataset, else None."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest.get("format") != CACHE_FORMAT:
            raise LddpmError(f"{self.path} is not an lddpm image cache (format {self.manifest.get('format')!r})")
        integrity.verify_arrays(self.path, self.manifest, cache_files(self.manifest), fix=rebuild_hint(self.manifest))
        try:
            self.images = np.load(self.path / "images.npy", mmap_mode="r")
            self.labels = np.load(self.path / "labels.npy")
        except (OSError, ValueError) as exc:
            raise LddpmError(f"cannot open the arrays of cache {self.path}: {exc}; delete it and prepare it again")
        n = self.manifest["count"]
        if self.images.shape[0] != n or self.labels.shape != (n,) or self.images.dtype != np.uint8:
            raise LddpmError(f"cache {self.path} arrays do not match its manifest (count {n}); delete it and prepare again")
        self.class_names: list[str] = list(self.manifest["class_names"])
        self.num_classes: int = len(self.class_names)
        self.resolution: int = int(self.images.shape[1])
        self.channels: int = int(self.images.shape[3])
        self.dataset: str = self.manifest["dataset"]
        self.split: str = self.manifest["split"]
        self.checksum: str = self.manifest["checksum"]
        self.captions: captions_mod.CaptionTable | None = None
        if "captions" in self.manifest:
            self.captions = captions_mod.CaptionTable.load(self.path, fix=rebuild_hint(self.manifest))
            if len(self.captions) != n:
                raise LddpmError(f"cache {self.path}: the caption table has {len(self.captions)} images, the images "
                                 f"{n}; {rebuild_hint(self.manifest)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"ImageCache({str(self.path)!r}, {self.dataset}/{self.split}, n={len(self)}, {self.resolution}px x{self.channels})"

    def verify(self) -> None:
        """Hash every byte of the arrays and raise LddpmError if they differ from the manifest."""
        integrity.verify_arrays(self.path, self.manifest, cache_files(self.manifest),
                                fix=rebuild_hint(self.manifest), full=True)


def open_cache(path: str | os.PathLike) -> ImageCache:
    """Open a folder written by `prepare`."""
    return ImageCache(path)


# ---------------------------------------------------------------------------------------------
# Writing a cache


def _check_request(folder: Path, manifest: dict, request: dict) -> None:
    old = manifest.get("request", {})
    diffs = [f"{k}: cached {old.get(k)!r}, requested {v!r}" for k, v in request.items()
             if k != "root" and old.get(k) != v]
    if request.get("root") is not None and old.get("root") is not None and old["root"] != request["root"]:
        diffs.append(f"root: cached {old['root']!r}, requested {request['root']!r}")
    if diffs:
        raise LddpmError(
            f"cache {folder} does not match the request ({'; '.join(diffs)}); "
            "use another --cache-dir, delete that folder, or pass --overwrite"
        )


def _read_raw(name: str, split: str, root: str | None, cache_dir: Path, caption_column: str = "text",
              skip_bad: bool = False) -> readers.RawDataset:
    if name == "captioned":
        return captions_mod.read_captioned(root, split=split, caption_column=caption_column, skip_bad=skip_bad).to_raw()
    if name in ("fashion-text", "fashion-pairs"):  # render the scene folder once, then read it as captioned data
        from lddpm.data import scenes

        folder = cache_dir / "scenes" / name
        if not (folder / split / "scenes.json").is_file():
            scenes.prepare_scenes(name, split, folder / split, root=root)
        return captions_mod.read_captioned(folder, split=split).to_raw()
    if name in ("fashion-mnist", "mnist"):
        return readers.read_mnist_like(name, split, root)
    if name in ("cifar10", "cifar100"):
        return readers.read_cifar(name, split, root, cache_dir / "downloads")
    if name == "imagenet100":
        return readers.read_imagenet100(split, root)
    return readers.read_imagefolder(split, root)


def _write_array_images(raw: readers.RawDataset, out: np.ndarray, resolution: int, fit: str, progress: bool) -> None:
    step = 4096
    with tqdm(total=len(out), unit="img", desc="preprocess", disable=not progress) as bar:
        for i in range(0, len(out), step):
            out[i:i + step] = preprocess.preprocess_array(raw.images[i:i + step], resolution, raw.mode, fit)
            bar.update(min(step, len(out) - i))


def _write_folder_images(
    raw: readers.RawDataset, out: np.ndarray, resolution: int, workers: int, skip_bad: bool, progress: bool
) -> list[str]:
    """Decode all files into `out` with a process pool; returns the skipped files (raises unless skip_bad)."""
    files = raw.files
    chunk = max(16, min(256, math.ceil(len(files) / (4 * max(1, workers)))))
    mode = "RGB" if raw.mode == "auto" else raw.mode
    jobs = [(files[i:i + chunk], resolution, mode) for i in range(0, len(files), chunk)]
    pool = multiprocessing.Pool(workers) if workers > 1 and len(jobs) > 1 else None
    skipped = []
    try:
        results = pool.imap(preprocess.load_chunk, jobs) if pool else map(preprocess.load_chunk, jobs)
        with tqdm(total=len(files), unit="img", desc="decode", disable=not progress) as bar:
            for k, (arr, bad) in enumerate(results):
                start = k * chunk
                out[start:start + len(arr)] = arr
                for i, err in bad:
                    if not skip_bad:
                        raise LddpmError(f"cannot read image {files[start + i]} ({err}); fix or remove it, or pass --skip-bad")
                    skipped.append(str(files[start + i]))
                bar.update(len(arr))
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return skipped


def _all_grey(images: np.ndarray, rows: np.ndarray) -> bool:
    """True if R == G == B at every pixel of images[rows] (uint8 NHWC, 3 channels)."""
    for i in range(0, len(rows), 4096):
        a = images[rows[i:i + 4096]]
        if not ((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()):
            return False
    return True


def _build(folder_tmp: Path, raw: readers.RawDataset, *, name: str, split: str, resolution: int, fit: str,
           workers: int, skip_bad: bool, progress: bool, request: dict) -> None:
    channels = 1 if raw.mode == "L" else 3
    n = len(raw.labels)
    images_path = folder_tmp / "images.npy"
    needed, free = n * resolution * resolution * channels, shutil.disk_usage(folder_tmp).free
    if needed > free:  # refuse before writing rather than fill the disk
        raise LddpmError(f"disk full: this cache needs {needed / 2**30:.2f} GiB ({n} images of {resolution}x{resolution}x{channels}) "
                         f"but {folder_tmp.parent} has {free / 2**30:.2f} GiB free; free some space, lower --resolution "
                         "or choose another --cache-dir")
    out = reserved_memmap(images_path, np.uint8, (n, resolution, resolution, channels))  # a full disk: OSError, not SIGBUS
    labels = raw.labels
    skipped: list[str] = []
    if raw.images is not None:
        _write_array_images(raw, out, resolution, fit, progress)
    else:
        skipped = _write_folder_images(raw, out, resolution, workers, skip_bad, progress)
    kept = np.arange(n)
    captions = raw.captions
    if skipped:
        skip = set(skipped)
        keep = np.array([str(f) not in skip for f in raw.files])
        if not keep.any():
            raise LddpmError(f"every image under {raw.root} was unreadable; nothing to prepare")
        kept = np.flatnonzero(keep)
        labels = labels[keep]
        if captions is not None:
            captions = [captions[i] for i in kept]
        if progress:
            print(f"skipped {len(skipped)} unreadable image(s) of {n}", flush=True)
    mode = raw.mode
    if mode == "auto":  # decoded as RGB: store one channel when every kept image is grey
        mode = "L" if _all_grey(out, kept) else "RGB"
        channels = 1 if mode == "L" else 3
    if skipped or channels != out.shape[3]:  # rewrite: drop skipped rows, keep `channels` channels
        compact_path = folder_tmp / "images.compact.npy"
        compact = reserved_memmap(compact_path, np.uint8, (len(kept),) + out.shape[1:3] + (channels,))
        for i in range(0, len(kept), 4096):
            compact[i:i + 4096] = out[kept[i:i + 4096], :, :, :channels]
        compact.flush()
        del compact, out
        os.replace(compact_path, images_path)
    else:
        out.flush()
        del out
    np.save(folder_tmp / "labels.npy", labels.astype(np.int64))
    arrays, checksum = array_checksums(folder_tmp, IMAGE_ARRAYS)
    caption_section = None
    if captions is not None:
        table = captions_mod.CaptionTable.from_lists(captions)
        arrays.update(table.save(folder_tmp))
        checksum = integrity.combined_checksum(arrays, IMAGE_ARRAYS + captions_mod.CAPTION_FILES)
        per_image = np.diff(table.offsets)
        caption_section = {
            **(raw.caption_info or {}),
            "files": list(captions_mod.CAPTION_FILES),
            "num_texts": len(table.texts),  # including "" at index 0
            "num_assignments": int(len(table.indices)),
            "per_image": {"min": int(per_image.min()), "max": int(per_image.max()), "mean": round(float(per_image.mean()), 4)},
            "null_index": 0,
        }
    counts = np.bincount(labels, minlength=len(raw.class_names))
    native = NATIVE_SIZE.get(name)
    steps = {"decode": "Pillow" if raw.files else f"{name} reader (uint8 arrays)", "mode": mode,
             "fit": fit, "dtype": "uint8", "layout": "NHWC"}
    if raw.mode == "auto":
        steps["channels"] = "decoded as RGB; stored as one channel because every image is grey" if mode == "L" \
            else "RGB (some image has colour)"
    if fit == "pad":
        steps["pad"] = f"zero padding from {native}x{native} to {resolution}x{resolution} ({(resolution - (native or resolution)) // 2} pixels each side)"
    elif native != resolution:
        steps["resize"] = preprocess.RESIZE_DESCRIPTION
    manifest = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "dataset": name,
        "split": split,
        "resolution": resolution,
        "channels": channels,
        "count": int(len(labels)),
        "num_classes": len(raw.class_names),
        "class_names": raw.class_names,
        "counts_per_class": {c: int(k) for c, k in zip(raw.class_names, counts)},
        "preprocessing": steps,
        "source": {"root": raw.root, "fingerprint": raw.fingerprint, "files": raw.sources},
        "skipped": {"count": len(skipped), "files": skipped[:100]},
        **({"captions": caption_section} if caption_section is not None else {}),
        "arrays": arrays,
        "checksum": checksum,
        "request": request,
        "lddpm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder_tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def prepare(
    name: str,
    *,
    resolution: int | None = None,
    split: str = "train",
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    download: bool = False,
    fit: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    caption_column: str = "text",
) -> Path:
    """Preprocess a dataset split once into a uint8 cache folder and return its path (idempotent).

    A cache whose manifest matches the request is reused; one that does not match is refused
    (LddpmError) unless `overwrite`. A new cache is written into a temporary sibling folder and
    renamed into place, so a failing prepare never damages an existing cache.

    "captioned" reads `root` in any format of lddpm.data.captions (metadata.jsonl/csv with the
    `caption_column`, .txt/.caption sidecars, WebDataset .tar shards, a COCO captions .json) and
    stores a caption table beside the images (`open_cache(path).captions`); `skip_bad` there also
    leaves out images without a caption and captions without an image.
    """
    check_dataset(name)
    _, default_res, _, _ = dataset_info(name)
    resolution = check_resolution("resolution", default_res if resolution is None else resolution)
    if SPLITS[name] is not None and split not in SPLITS[name]:
        raise LddpmError(f"unknown split {split!r} for {name}; choose one of {', '.join(SPLITS[name])}")
    fit = fit or default_fit(name, resolution)
    if fit not in FITS:
        raise LddpmError(f"unknown fit {fit!r}; choose one of {', '.join(FITS)}")
    if fit == "pad" and (name not in NATIVE_SIZE or resolution < NATIVE_SIZE[name]):
        raise LddpmError(f"fit 'pad' needs an array dataset ({', '.join(NATIVE_SIZE)}) and a resolution at least its native size; use fit 'resize'")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if root is None and name == "imagefolder":
        raise LddpmError("imagefolder needs --root DIR (a folder of class subfolders, or of split folders)")
    if root is None and name == "captioned":
        raise LddpmError("captioned needs --root PATH: a folder with metadata.jsonl/csv, images with .txt/.caption "
                         "files or .tar shards, or a COCO captions .json or one .tar shard")
    folder = cache_dir / cache_name(name, split, resolution, fit, root)
    remove_stale_temp_files(cache_dir)  # temp folders of a killed prepare (never a running one's)
    request = {"dataset": name, "split": split, "resolution": resolution, "fit": fit,
               "root": str(Path(root).resolve()) if root is not None else None}
    if name == "captioned":
        request["caption_column"] = caption_column

    if (folder / "manifest.json").is_file() and not overwrite:
        _check_request(folder, read_manifest(folder), request)
        ImageCache(folder)  # arrays present and consistent
        return folder
    if folder.exists() and not (folder / "manifest.json").is_file():
        raise LddpmError(f"{folder} exists but is not a prepared cache (no manifest.json); remove it or use another --cache-dir")

    if download:
        if name not in readers.CIFAR_ARCHIVES:
            raise LddpmError(f"--download is offered for cifar10 and cifar100 only, not {name}")
        spec = readers.CIFAR_ARCHIVES[name]
        target = Path(root) if root is not None else cache_dir / "downloads"
        download_file(spec["url"], target / spec["filename"], spec["md5"], progress=progress)
    raw = _read_raw(name, split, str(Path(root).resolve()) if root is not None else None, cache_dir,
                    caption_column=caption_column, skip_bad=skip_bad)
    workers = int(workers or min(8, os.cpu_count() or 1))

    tmp = make_temp_dir(folder)
    try:
        try:
            _build(tmp, raw, name=name, split=split, resolution=resolution, fit=fit, workers=workers,
                   skip_bad=skip_bad, progress=progress, request=request)
            if folder.exists():  # overwrite: swap, then drop the old cache
                swap_in_dir(tmp, folder)
            else:
                try:
                    os.rename(tmp, folder)
                except OSError:  # another process finished the same cache first
                    _check_request(folder, read_manifest(folder), request)
        except OSError as exc:  # disk full, permissions: the old cache (if any) is untouched
            raise os_error(exc, folder) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
