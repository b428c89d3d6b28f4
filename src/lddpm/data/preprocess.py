"""The one preprocessing pipeline: decode, convert, resize the shorter side, centre-crop (or pad).

Every image ends as uint8 (R, R, C), C = 1 for grey datasets and 3 for RGB ones. Resizing uses
Pillow's antialiased BICUBIC filter with `reducing_gap` (a box reduction by an integer factor first
when the downscale is large), the same kind of pipeline as ADM/guided-diffusion's centre crop.
"""

from __future__ import annotations

import io
from typing import NamedTuple, Union

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 2.0

RESIZE_DESCRIPTION = (
    f"shorter side to the resolution with Pillow BICUBIC (antialiased, reducing_gap={REDUCING_GAP}), "
    "then centre crop"
)


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (antialiased) and crop the centre square."""
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, resample=RESAMPLE, reducing_gap=REDUCING_GAP)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def to_array(img: Image.Image, mode: str) -> np.ndarray:
    """A PIL image as uint8 (H, W, C) in `mode` ("L" -> C=1, "RGB" -> C=3)."""
    arr = np.asarray(img.convert(mode), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def pad_center(images: np.ndarray, resolution: int) -> np.ndarray:
    """Zero-pad (N, h, w, C) images equally on each side to (N, R, R, C) (28 -> 32 adds 2 pixels)."""
    n, h, w, c = images.shape
    top, left = (resolution - h) // 2, (resolution - w) // 2
    out = np.zeros((n, resolution, resolution, c), dtype=np.uint8)
    out[:, top:top + h, left:left + w] = images
    return out


def preprocess_array(images: np.ndarray, resolution: int, mode: str, fit: str) -> np.ndarray:
    """Bring decoded uint8 images (N,h,w[,C]) to (N,R,R,C): identity, zero padding or resize+crop."""
    if images.ndim == 3:
        images = images[:, :, :, None]
    n, h, w, c = images.shape
    if (h, w) == (resolution, resolution):
        return np.ascontiguousarray(images)
    if fit == "pad":
        return pad_center(images, resolution)
    out = np.empty((n, resolution, resolution, c), dtype=np.uint8)
    for i in range(n):  # small images: per-image Pillow resize is cheap
        src = Image.fromarray(images[i, :, :, 0] if c == 1 else images[i])
        out[i] = to_array(resize_center_crop(src, resolution), mode)
    return out


class TarMember(NamedTuple):
    """An image stored inside an uncompressed tar file (a WebDataset shard): its bytes' place."""

    tar: str
    name: str
    offset: int  # byte offset of the member's data in the tar file
    size: int

    def __str__(self) -> str:
        return f"{self.tar}:{self.name}"

    def read(self) -> bytes:
        """The member's bytes (OSError if the tar is shorter than the member says)."""
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.tar} ends inside member {self.name} (truncated tar)")
        return data


ImageSource = Union[str, TarMember]  # a file path, or an image inside a tar shard


def load_image(source: ImageSource, resolution: int, mode: str) -> np.ndarray:
    """Decode one image (file or tar member) and preprocess it; raises OSError/ValueError if it is unreadable."""
    with Image.open(io.BytesIO(source.read()) if isinstance(source, TarMember) else source) as img:
        img.load()
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
            if img.mode == "RGBA":  # composite transparency on white, not on undefined colours
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, img)
        img = img.convert(mode)
        return to_array(resize_center_crop(img, resolution), mode)


def load_chunk(args: tuple[list[ImageSource], int, str]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Worker: decode a chunk of files; returns (uint8 (n,R,R,C) with zeros where bad, [(i, error)])."""
    files, resolution, mode = args
    c = 1 if mode == "L" else 3
    out = np.zeros((len(files), resolution, resolution, c), dtype=np.uint8)
    bad = []
    for i, f in enumerate(files):
        try:
            out[i] = load_image(f, resolution, mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            bad.append((i, f"{type(exc).__name__}: {exc}"))
    return out, bad
