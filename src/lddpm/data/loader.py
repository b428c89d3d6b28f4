"""Deterministic, stateless batch loading from a prepared cache.

`batch(step)` depends only on (seed, step, rank, world_size): global batch positions
[step * G, (step + 1) * G) with G = batch_size * world_size run through the epochs of the data,
epoch e visiting the samples in the order of a permutation drawn from a generator seeded by
(seed, e). Rank r takes positions [step * G + r * B, step * G + (r + 1) * B), so ranks are disjoint
and their union is the global batch. Resuming at any step reproduces the same batches exactly.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from lddpm.errors import LddpmError


class EpochSampler:
    """Maps (step, rank) to sample indices: per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise LddpmError("the dataset is empty; nothing to load")
        if batch_size < 1:
            raise LddpmError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise LddpmError(f"rank must be in [0, world_size), got rank {rank} and world_size {world_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.global_batch = batch_size * world_size
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def permutation(self, epoch: int) -> np.ndarray:
        """The visiting order of epoch `epoch` (cached, a few epochs at a time)."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perms[epoch] = perm
            while len(self._perms) > 3:
                self._perms.popitem(last=False)
        return perm

    def positions(self, step: int) -> np.ndarray:
        """This rank's global positions (step*G + rank*B + arange(B)) in the endless epoch stream."""
        if step < 0:
            raise LddpmError(f"step must be >= 0, got {step}")
        start = step * self.global_batch + self.rank * self.batch_size
        return np.arange(start, start + self.batch_size, dtype=np.int64)

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of this rank's shard of global batch `step`."""
        pos = self.positions(step)
        epochs, offsets = np.divmod(pos, self.num_samples)
        if epochs[0] == epochs[-1]:
            return self.permutation(int(epochs[0]))[offsets]
        out = np.empty_like(pos)
        for e in np.unique(epochs):  # a batch that spans an epoch boundary
            sel = epochs == e
            out[sel] = self.permutation(int(e))[offsets[sel]]
        return out

    def rng(self, step: int, stream: int) -> np.random.Generator:
        """A generator that is a pure function of (seed, step, stream) (shared by all ranks)."""
        return np.random.default_rng([self.seed, step, stream])

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per pass over the data."""
        return self.num_samples / self.global_batch


def uint8_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B,H,W,C) -> float32 (B,C,H,W) in [-1, 1] (x / 127.5 - 1)."""
    arr = images.transpose(0, 3, 1, 2)
    if not (arr.flags.c_contiguous and arr.flags.writeable):
        arr = np.array(arr, order="C")  # one uint8 copy (a memmap slice is read-only)
    x = torch.from_numpy(arr)
    return x.to(torch.float32).mul_(1.0 / 127.5).sub_(1.0)


def iterate_batches(batch_fn, step: int, prefetch: int) -> Iterator:
    """Yield batch_fn(step), batch_fn(step + 1), ... forever, optionally from a background thread."""
    if prefetch <= 0:
        while True:
            yield batch_fn(step)
            step += 1
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def work(s: int) -> None:
        while not stop.is_set():
            try:
                item = (True, batch_fn(s))
            except BaseException as exc:  # hand the error to the consumer
                item = (False, exc)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return
            s += 1

    thread = threading.Thread(target=work, args=(step,), daemon=True, name="lddpm-prefetch")
    thread.start()
    try:
        while True:
            ok, value = q.get()
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


class ImageLoader:
    """Batches from an ImageCache: `batch(step) -> (x float32 (B,C,H,W) in [-1,1], y int64 (B,))`.

    A pure function of (seed, step, rank, world_size); `hflip` mirrors each image of the global
    batch with probability 1/2, decided by a generator seeded by (seed, step).
    """

    def __init__(self, cache, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 hflip: bool = False):
        if not hasattr(cache, "images"):  # a cache folder path
            from lddpm.data.cache import open_cache

            cache = open_cache(cache)
        self.cache = cache
        self.images, self.labels = cache.images, np.asarray(cache.labels, dtype=np.int64)
        self.sampler = EpochSampler(len(self.labels), batch_size, seed=seed, rank=rank, world_size=world_size)
        self.batch_size, self.hflip = batch_size, hflip

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per pass over the data."""
        return self.sampler.steps_per_epoch

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of this rank's part of global batch `step`."""
        return self.sampler.indices(step)

    def batch_uint8(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch as uint8 (B,H,W,C) (flips applied) and int64 labels, before scaling."""
        idx = self.sampler.indices(step)
        images = self.images[idx]  # one fancy-indexing read from the memmap
        if self.hflip:
            g = self.sampler.global_batch
            flips = self.sampler.rng(step, 1).random(g) < 0.5
            start = self.sampler.rank * self.batch_size
            flips = flips[start:start + self.batch_size]
            images[flips] = images[flips, :, ::-1]
        return images, self.labels[idx]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of global batch `step` for this rank: x float32 (B,C,H,W) in [-1,1], y int64 (B,)."""
        images, labels = self.batch_uint8(step)
        return uint8_to_tensor(images), torch.from_numpy(labels)

    def iter_from(self, step: int = 0, *, prefetch: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batch(step), batch(step + 1), ... forever (`prefetch` > 0: from a background thread)."""
        return iterate_batches(self.batch, step, prefetch)
