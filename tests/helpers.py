"""Small test inputs shared by several test files: Fashion-MNIST-format IDX files and a stand-in feature network."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn


def write_idx_pair(root: Path, images: dict[str, np.ndarray], labels: np.ndarray) -> Path:
    """Gzipped IDX files `<split>-images-idx3-ubyte.gz` / `-labels-idx1-ubyte.gz` for each split's uint8 (n, 28, 28)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, data in images.items():
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(data), 28, 28) + data.tobytes())
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())
    return root


def write_random_idx(root: Path, n: int = 40) -> Path:
    """Tiny Fashion-MNIST-format train and t10k splits of the same random images, labels 0..9 in turn."""
    images = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return write_idx_pair(root, {"train": images, "t10k": images}, np.arange(n) % 10)


class ConvFeatures(nn.Module):
    """A tiny scriptable stand-in for the Inception feature network (4-d features)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))
