"""A small CNN classifier for class metrics and the classifier score, plus the standard Inception Score.

The pinned FID network has no classification head, so class accuracy of conditional samples and the
classifier score exp(E_x KL(p(y|x) || p(y))) (the formula of the Inception Score, Eq. 1 of Salimans et
al. 2016, with this classifier in place of Inception; not comparable to published Inception Scores) use
a classifier trained on the dataset's own training split. An Inception Score proper needs an Inception
classification network (`load_is_network`, `lddpm eval --is-network`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lddpm import __version__
from lddpm.data import dataset_info, open_cache, prepare, test_split
from lddpm.errors import LddpmError
from lddpm.io import atomic_dir, remove_stale_temp_files, rust_io_errors, write_text
from lddpm.metrics.fid import default_cache_dir
from lddpm.metrics.inception import batch_starts, check_images, load_torchscript

WEIGHTS_FILE = "model.safetensors"
META_FILE = "classifier.json"


class SmallClassifier(nn.Module):
    """Three conv blocks (two 3x3 conv + BN + ReLU each, max-pool, dropout), global average pool, linear head.

    About 72k parameters at the default width 16; input (N, C, H, W) in [-1, 1], any H, W >= 8.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, dropout: float = 0.1):
        super().__init__()
        self.in_channels, self.num_classes, self.width, self.dropout = in_channels, num_classes, width, dropout
        layers, ch = [], in_channels
        for mult in (1, 2, 4):
            out = width * mult
            for cin in (ch, out):
                layers += [nn.Conv2d(cin, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
            ch = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.features(x).mean(dim=(2, 3)))


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    images = np.asarray(images)
    if not images.flags.writeable:  # a memory-mapped cache: torch wants a writable buffer
        images = images.copy()
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    epochs: float = 2,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 16,
    hflip: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[SmallClassifier, float]:
    """Train a SmallClassifier with AdamW and a one-cycle learning rate; returns (model, test accuracy)."""
    train_images, test_images = check_images(train_images, "training images"), check_images(test_images, "test images")
    train_labels = np.asarray(train_labels, dtype=np.int64)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallClassifier(train_images.shape[-1], num_classes, width).to(device)
    steps_per_epoch = max(1, len(train_images) // batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.25)
    bar = range(total)
    if progress:
        bar = tqdm(bar, desc="train classifier", unit="step")
    model.train()
    order = torch.randperm(len(train_images), generator=gen)
    for step in bar:
        pos = (step % steps_per_epoch) * batch_size
        if step and pos == 0:
            order = torch.randperm(len(train_images), generator=gen)
        idx = np.sort(order[pos : pos + batch_size].numpy())
        x = to_model_input(train_images[idx]).to(device)
        y = torch.from_numpy(train_labels[idx]).to(device)
        if hflip:
            flip = torch.rand(len(x), generator=gen) < 0.5
            x[flip] = x[flip].flip(3)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    probs = class_probabilities(model, test_images, device=device)
    return model, class_accuracy(probs, test_labels)


def default_hflip(dataset: str) -> bool:
    """Whether the class-metrics classifier trains with random horizontal flips by default: yes, except for
    MNIST and Fashion-MNIST (the one default for `lddpm train-classifier`, the study and the library)."""
    return dataset not in ("mnist", "fashion-mnist")


def train_dataset_classifier(
    dataset: str,
    resolution: int,
    *,
    epochs: float = 2.0,
    batch_size: int = 128,
    lr: float = 3e-3,
    hflip: bool | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Path, dict]:
    """Train the class-metrics classifier on a dataset's prepared train split and save it; returns (folder, meta).

    hflip None means `default_hflip(dataset)`. The test accuracy is measured on the dataset's test split
    (`val` for ImageNet-100).
    """
    if dataset_info(dataset, root)[2] == 0:
        raise LddpmError(f"dataset {dataset!r} has no class labels; train the class-metrics classifier on a labelled "
                         "dataset (an imagefolder needs one subfolder per class)")
    hflip = default_hflip(dataset) if hflip is None else hflip
    kw = dict(resolution=resolution, root=root, cache_dir=cache_dir, progress=progress)
    train = open_cache(prepare(dataset, split="train", **kw))
    test = open_cache(prepare(dataset, split=test_split(dataset), **kw))
    model, acc = train_classifier(
        train.images, train.labels, test.images, test.labels, num_classes=train.num_classes, epochs=epochs,
        batch_size=batch_size, lr=lr, hflip=hflip, seed=seed, device=device, progress=progress,
    )
    folder = Path(out) if out else default_classifier_dir(dataset, train.resolution, cache_dir)
    meta = {
        "dataset": dataset, "resolution": train.resolution, "channels": train.channels,
        "test_accuracy": acc, "test_split": test.split, "num_test": len(test), "class_names": train.class_names,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "hflip": hflip, "seed": seed,
        "train_checksum": train.checksum, "num_parameters": sum(p.numel() for p in model.parameters()),
        "lddpm_version": __version__,
    }
    save_classifier(model, folder, meta)
    return folder, meta


@torch.inference_mode()
def class_probabilities(
    model: nn.Module, images: np.ndarray, *, batch_size: int = 256, device: str | torch.device = "cpu", progress: bool = False
) -> np.ndarray:
    """Softmax class probabilities (N, num_classes) of uint8 (N, H, W, C) images, float64."""
    images = check_images(images)
    channels = getattr(model, "in_channels", images.shape[-1])
    if images.shape[-1] != channels:
        raise LddpmError(f"the classifier takes {channels}-channel images, got {images.shape[-1]} channels")
    model.eval()
    out = []
    for i in batch_starts(len(images), batch_size, progress, "classifier"):
        x = to_model_input(images[i : i + batch_size]).to(device)
        out.append(torch.softmax(model(x).double(), dim=1).cpu().numpy())
    return np.concatenate(out)


def class_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose most probable class is the given label."""
    labels = np.asarray(labels)
    if len(labels) != len(probs):
        raise LddpmError(f"{len(labels)} labels for {len(probs)} images")
    return float((np.asarray(probs).argmax(axis=1) == labels).mean())


def inception_score(probs: np.ndarray, splits: int = 1) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) (Eq. 1 of Salimans et al. 2016); mean and std over `splits` chunks."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < splits:
        raise LddpmError(f"class probabilities must be (N, C) with N >= splits={splits}, got {probs.shape}")
    scores = []
    for part in np.array_split(probs, splits):
        p_y = part.mean(axis=0, keepdims=True)
        log_ratio = np.log(np.where(part > 0, part, 1.0)) - np.log(np.where(p_y > 0, p_y, 1.0))
        kl = (part * log_ratio).sum(axis=1)  # 0 log 0 = 0
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def default_classifier_dir(dataset: str, resolution: int, cache_dir: str | Path | None = None) -> Path:
    """`<cache>/classifiers/<dataset>-<resolution>`, cache = $LDDPM_CACHE or ~/.cache/lddpm."""
    return Path(cache_dir or default_cache_dir()) / "classifiers" / f"{dataset}-{resolution}"


def save_classifier(model: SmallClassifier, out_dir: str | Path, meta: dict) -> Path:
    """Write model.safetensors and classifier.json (architecture + `meta`) as the folder `out_dir`, atomically.

    Both files go into a temporary folder beside `out_dir`, which then replaces it (lddpm.io.atomic_dir): a failed
    or killed save leaves the previous classifier whole, and the next save removes a killed one's temporary folder.
    A folder holding other files is refused.
    """
    out_dir = Path(out_dir)
    remove_stale_temp_files(out_dir.parent)  # a killed save's temporary folder
    if out_dir.is_dir():
        remove_stale_temp_files(out_dir)  # temporary files of a killed save into the folder itself (older lddpm)
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in (WEIGHTS_FILE, META_FILE))
        if others:
            raise LddpmError(f"{out_dir} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                             "save the classifier to a new or empty folder (--out)")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    arch = {"in_channels": model.in_channels, "num_classes": model.num_classes, "width": model.width, "dropout": model.dropout}
    text = json.dumps({**meta, "architecture": arch}, indent=2, sort_keys=True) + "\n"
    with atomic_dir(out_dir) as tmp:
        with rust_io_errors(tmp / WEIGHTS_FILE):
            save_file(state, str(tmp / WEIGHTS_FILE))
        write_text(tmp / META_FILE, text)
    return out_dir


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[SmallClassifier, dict]:
    """Load a classifier folder written by `save_classifier`; returns (model in eval mode, metadata)."""
    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise LddpmError(f"no classifier in {str(path)!r}; train one with `lddpm train-classifier DATASET`")
    try:
        meta = json.loads((path / META_FILE).read_text())
        model = SmallClassifier(**meta["architecture"])
        weights = load_file(str(path / WEIGHTS_FILE))
        model.load_state_dict(weights)
    except Exception as exc:  # damaged JSON or weights, a missing key, weights that do not fit
        raise LddpmError(f"the classifier in {str(path)!r} is damaged ({type(exc).__name__}: {str(exc)[:200]}); "
                         "train it again with `lddpm train-classifier DATASET`") from None
    if not all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point()):
        raise LddpmError(f"the classifier weights in {str(path)!r} contain NaN or infinity; "
                         "train it again with `lddpm train-classifier DATASET`")
    return model.to(device).eval(), meta


def load_is_network(path: str | Path, expected_sha1: str | None = None) -> tuple[nn.Module, str]:
    """A TorchScript classification network for the standard Inception Score; returns (net, sha1).

    Interface (NVIDIA's `inception-2015-12-05.pt`): net(x, return_features=False) with x float32
    (N, 3, H, W) in [0, 255] returns softmax probabilities (N, 1008).
    """
    return load_torchscript(path, expected_sha1, "Inception Score network")


@torch.inference_mode()
def network_probabilities(
    net: nn.Module, images: np.ndarray, *, batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = False
) -> np.ndarray:
    """Class probabilities from an IS network called as net(x [0, 255] float (N, 3, H, W), return_features=False)."""
    images = check_images(images)
    net = net.to(device).eval()
    out = []
    for i in batch_starts(len(images), batch_size, progress, "inception score"):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device).permute(0, 3, 1, 2).float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        try:
            p = net(x, return_features=False)
        except Exception as exc:  # noqa: BLE001 - TorchScript raises plain RuntimeErrors
            raise LddpmError(
                f"the Inception Score network failed: {exc}; it must accept (x, return_features=False) "
                "and return class probabilities"
            ) from None
        p = p.double().cpu()
        if p.ndim != 2 or p.shape[0] != x.shape[0] or (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-3):
            raise LddpmError(
                "the Inception Score network must return softmax probabilities (N, classes) summing to 1; "
                f"got shape {tuple(p.shape)}"
            )
        out.append(p.numpy())
    return np.concatenate(out)
