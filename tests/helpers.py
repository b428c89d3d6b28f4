"""Small test inputs shared by several test files: Fashion-MNIST-format IDX files, a captioned image folder and
the tiny text-run config, and a stand-in feature network."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image
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


CAPTIONS = {"bright": ["a bright square", "a white block"], "dark": ["a dark square"]}


def write_captioned_squares(base: Path, num: int, *, jitter: bool) -> tuple[Path, Path]:
    """An image folder of 16x16 squares (bright or dark in turn) with `metadata.jsonl` captions from CAPTIONS, and
    a cache dir: (data root, cache dir). `jitter` places each 6x6 square at random, else an 8x8 one at the centre."""
    folder = base / "images" / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(num):
        kind = "bright" if i % 2 else "dark"
        img = np.zeros((16, 16), np.uint8)
        r, c, size = (*rng.integers(2, 8, size=2), 6) if jitter else (4, 4, 8)
        img[r:r + size, c:c + size] = 230 if kind == "bright" else 90
        Image.fromarray(img).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": CAPTIONS[kind]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return base / "images", base / "cache"


TINY_TEXT_NETWORKS = {
    "unet": ["model.overrides={model_channels=8, channel_mult=[1, 2], attention_resolutions=[8], num_heads=2}"],
    "dit": ['model.kind="dit"', 'model.name="dit-tiny/4"', "model.overrides={hidden_size=16, depth=2, num_heads=2}"],
}


def tiny_text_config(captioned: tuple[Path, Path], encoder: str, max_length: int, steps: int, *sets: str,
                     network: str = "unet"):
    """The fashion-quick preset shrunk to a seconds-long text run on `write_captioned_squares`' folder."""
    from lddpm.config import apply_overrides, config_from_preset

    root, cache = captioned
    base = [f"data.root={json.dumps(str(root))}", f"data.cache_dir={json.dumps(str(cache))}", 'data.dataset="captioned"',
            "data.resolution=16", "optim.batch_size=8", f"run.steps={steps}", "run.log_every=1", "run.sample_every=0",
            "run.checkpoint_every=100", 'run.device="cpu"', "run.num_sample_images=4", "run.sample_steps=2",
            "run.class_conditional=false", f"text.encoder={json.dumps(encoder)}", f"text.max_length={max_length}",
            "text.caption_dropout=0.25"]
    return apply_overrides(config_from_preset("fashion-quick"), base + TINY_TEXT_NETWORKS[network] + list(sets))


class ConvFeatures(nn.Module):
    """A tiny scriptable stand-in for the Inception feature network (4-d features)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))
