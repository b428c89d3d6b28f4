"""Sampling for evaluation: resumable batches with their own seeds, labels, and the cost of sampling."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from lddpm.errors import LddpmError
from lddpm.evaluate.reference import maybe_tqdm
from lddpm.io import locks_folder, write_json, write_npz
from lddpm.metrics import check_images
from lddpm.seeding import batch_seed

try:
    import resource
except ImportError:  # Windows
    resource = None

# (images uint8 (n,H,W,C), labels or None) from (n, labels for the batch or None, seed)
GenerateBatch = Callable[[int, "np.ndarray | None", int], "tuple[np.ndarray, np.ndarray | None]"]


def balanced_labels(num: int, num_classes: int) -> np.ndarray:
    """Labels 0..C-1 repeated (N/C per class, the remainder to the first classes), interleaved so every batch is balanced."""
    if num_classes < 1:
        raise LddpmError("balanced labels need a class-conditional model (num_classes >= 1)")
    return np.arange(num, dtype=np.int64) % num_classes


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
    if resource is None:  # Windows
        return {"peak_memory_mib": None, "peak_memory_kind": None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
    return {"peak_memory_mib": rss_mib, "peak_memory_kind": "process_max_rss"}


@locks_folder("partial_dir", "partial samples folder")  # one writer per partial folder
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
            write_json(meta, want, sort_keys=True)
    images, out_labels, times, resumed = [], [], [], 0
    starts = list(range(0, num, batch_size))
    for index, start in enumerate(maybe_tqdm(starts, progress, desc="sampling", unit="batch")):
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
            write_npz(path, images=x, **({} if y is None else {"labels": y}))
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
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise LddpmError(f"no .png files in {str(path)!r}")
        arrays = []
        for f in files:
            try:
                with Image.open(f) as img:
                    arrays.append(np.asarray(img.convert("L" if img.mode in ("L", "I", "I;16", "1") else "RGB")))
            except (OSError, ValueError) as exc:
                raise LddpmError(f"{f} is not a readable image ({exc}); remove it from {path}") from None
        if len({a.shape for a in arrays}) != 1:
            raise LddpmError(f"the PNG files in {str(path)!r} differ in size or channels; all must match")
        return check_images(np.stack(arrays), f"images in {path}"), None
    raise LddpmError(f"--images must be a folder of PNG files or an .npz file, got {str(path)!r}")
