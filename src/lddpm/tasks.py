"""Conditioning images for restoration tasks: random inpainting masks, low-resolution inputs, and the extra
input channels a network trained for a task reads (`[task]` in the config).

A task network takes its condition as extra input channels concatenated with x_t at every step
(`cond_image` of the U-Net and DiT):

- "inpaint" (as Stable Diffusion's inpainting U-Net, Rombach et al. 2022): [mask, image * (1 - mask)],
  1 + C channels. A mask is 1 where pixels are to be generated (white in a mask PNG) and 0 where they
  are kept; the masked image holds the kept pixels and 0 (mid-grey in [-1, 1]) elsewhere.
- "super-resolution" (SR3, Saharia et al. 2021): the image downsampled `factor` times (area average)
  and upsampled back with bicubic interpolation, C channels.

The trainer builds these channels from each batch (`task_condition`); the sampling side builds them
from the user's image and mask (`inpaint_condition`, `upsample`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from lddpm.errors import LddpmError

TASKS = ("generate", "inpaint", "super-resolution")
MASK_KINDS = ("box", "half", "strokes", "center")


def cond_channels(task: str, channels: int) -> int:
    """Extra input channels of a network trained for `task` on images of `channels` channels."""
    if task not in TASKS:
        raise LddpmError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return {"generate": 0, "inpaint": 1 + channels, "super-resolution": channels}[task]


def _uniform(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """n uniform numbers in [0, 1) from `generator` (on its device), as float64 on CPU."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64).cpu()


def box_mask(size: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """A (size, size) mask with ones on the rectangle [top, top + height) x [left, left + width)."""
    m = torch.zeros(size, size)
    m[max(top, 0):top + height, max(left, 0):left + width] = 1.0
    return m


def center_mask(size: int) -> torch.Tensor:
    """The centre square of half the side (a quarter of the pixels), the usual fixed inpainting mask."""
    q = size // 4
    return box_mask(size, q, q, size - 2 * q, size - 2 * q)


def half_mask(size: int, side: int) -> torch.Tensor:
    """One half of the image: side 0 left, 1 right, 2 top, 3 bottom."""
    h = size // 2
    return [box_mask(size, 0, 0, size, h), box_mask(size, 0, h, size, size - h),
            box_mask(size, 0, 0, h, size), box_mask(size, h, 0, size - h, size)][side]


def stroke_mask(size: int, u: Sequence[float]) -> torch.Tensor:
    """Free-form strokes (the masks of Yu et al. 2019, "Free-form image inpainting with gated convolution"):
    2-4 polylines of 2-5 segments with random angles and lengths, drawn with a brush of radius 1-3 pixels
    (scaled to 32 pixels). `u` supplies the random numbers (at least 64 uniforms in [0, 1))."""
    u = list(u)
    it = iter(u)
    scale = size / 32.0
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    mask = torch.zeros(size, size, dtype=torch.bool)
    for _ in range(2 + int(next(it) * 3)):
        y, x = next(it) * (size - 1), next(it) * (size - 1)
        radius = (1.0 + 2.0 * next(it)) * scale
        for _ in range(2 + int(next(it) * 4)):
            angle = next(it) * 2 * math.pi
            length = (4.0 + 8.0 * next(it)) * scale
            y2 = min(max(y + length * math.sin(angle), 0.0), size - 1.0)
            x2 = min(max(x + length * math.cos(angle), 0.0), size - 1.0)
            # distance of every pixel centre to the segment (y, x) -> (y2, x2)
            dy, dx = y2 - y, x2 - x
            t = ((yy - y) * dy + (xx - x) * dx) / max(dy * dy + dx * dx, 1e-12)
            t = t.clamp(0.0, 1.0)
            mask |= ((yy - (y + t * dy)) ** 2 + (xx - (x + t * dx)) ** 2) <= radius ** 2
            y, x = y2, x2
    return mask.float()


STROKE_UNIFORMS = 64


def random_masks(n: int, size: int, kinds: Sequence[str], generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """n random masks (n, 1, size, size), 1 = generate: each of a kind drawn uniformly from `kinds`.

    box: a rectangle with sides uniform in [size/4, 3 size/4] at a uniform position; half: one of the four
    halves; strokes: free-form strokes (`stroke_mask`); center: the centre square (`center_mask`). All
    randomness comes from `generator`, so a training step's masks are a function of its seed.
    """
    bad = [k for k in kinds if k not in MASK_KINDS]
    if bad or not kinds:
        raise LddpmError(f"unknown mask kind {bad[0] if bad else '(none given)'!r}; choose from {', '.join(MASK_KINDS)}")
    u = _uniform(n * (STROKE_UNIFORMS + 1), generator, device).view(n, STROKE_UNIFORMS + 1).tolist()
    masks = []
    for row in u:
        kind = kinds[min(int(row[0] * len(kinds)), len(kinds) - 1)]
        if kind == "box":
            lo, hi = max(1, size // 4), max(1, (3 * size) // 4)
            h, w = lo + int(row[1] * (hi - lo + 1)), lo + int(row[2] * (hi - lo + 1))
            masks.append(box_mask(size, int(row[3] * (size - h + 1)), int(row[4] * (size - w + 1)), h, w))
        elif kind == "half":
            masks.append(half_mask(size, min(int(row[1] * 4), 3)))
        elif kind == "center":
            masks.append(center_mask(size))
        else:
            masks.append(stroke_mask(size, row[1:]))
    return torch.stack(masks)[:, None].to(device)


def inpaint_condition(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting network's extra channels: [mask, image * (1 - mask)] (B, 1 + C, H, W).

    image in [-1, 1] (B, C, H, W); mask (B, 1, H, W) or (1, 1, H, W), 1 = generate.
    """
    mask = mask.to(image.dtype).expand(image.shape[0], 1, *image.shape[2:])
    return torch.cat([mask, image * (1.0 - mask)], dim=1)


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Area-average downsampling by an integer factor (the low-resolution image of SR3's training pairs)."""
    if image.shape[-1] % factor or image.shape[-2] % factor:
        raise LddpmError(f"an image of {image.shape[-2]}x{image.shape[-1]} cannot be downsampled by {factor}; "
                         "the factor must divide its size")
    return F.avg_pool2d(image, factor)


def upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling to size x size, clamped to [-1, 1] (SR3's network input, and the classical baseline)."""
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def task_condition(task: str, image: torch.Tensor, *, masks: Sequence[str] = ("box",), factor: int = 4,
                   generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The extra channels a `task` network is trained with for a batch of clean images in [-1, 1] (None: generate).

    inpaint: random masks of `masks` kinds (drawn from `generator`); super-resolution: the batch downsampled
    `factor` times and upsampled back.
    """
    if task == "generate":
        return None
    if task == "inpaint":
        m = random_masks(image.shape[0], image.shape[-1], masks, generator, image.device)
        return inpaint_condition(image, m)
    if task == "super-resolution":
        return upsample(downsample(image, factor), image.shape[-1])
    raise LddpmError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
