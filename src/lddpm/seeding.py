"""The seed derivations several modules share, in one place (the data loaders, KID's subsets and the
scene sets seed their own generators where they draw).

Each is a pure function of its arguments, so training, sampling and evaluation draw the same random
numbers after a resume, in another process, or with another batch size.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def _hash_seed(*parts: object) -> int:
    """A 63-bit seed from the SHA-256 of the parts joined by '/'."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_seed(seed: int, step: int, shard: int) -> int:
    """Seed of the random draws of one training micro-batch (step, shard) of a run."""
    return _hash_seed("lddpm", seed, step, shard)


def image_seed(seed: int, index: int) -> int:
    """Seed of the sampling noise stream of image `index` of a generation with base `seed`."""
    return _hash_seed("lddpm-image", seed, index)


def batch_seed(seed: int, index: int) -> int:
    """A 31-bit seed for evaluation batch `index` of a run with base `seed` (resume draws the same noise)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def subset_indices(total: int, num: int, seed: int) -> np.ndarray:
    """`num` sorted indices out of `total`, drawn without replacement by a seeded permutation."""
    if num >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:num])


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(int(seed))


def item_hashes(seed: int, step: int, stream: int, items: np.ndarray) -> np.ndarray:
    """One uint64 per item, a pure function of (seed, step, stream, item): per-item draws that do
    not depend on which other items share the batch (e.g. the caption picked for each image).

    The key comes from SeedSequence([seed, step, stream]); each item is mixed in with the SplitMix64
    finaliser (Steele et al. 2014), so equal keys and items give equal values in any process.
    """
    key = np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(1, np.uint64)[0]
    x = np.asarray(items, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x * np.uint64(0x9E3779B97F4A7C15) + key
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
