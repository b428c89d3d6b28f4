"""Image grids: one tiling function for training grids, `lddpm sample` and the study's labelled grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lddpm.errors import LddpmError
from lddpm.io import write_png


def tile_rows(rows: list[list[np.ndarray]], *, scale: int = 1, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile rows of equally sized uint8 images (H, W, C), each upscaled `scale` times, `padding` pixels apart."""
    first = next(img for row in rows for img in row)
    h, w, c = first.shape
    th, tw = h * scale + padding, w * scale + padding
    cols = max(len(row) for row in rows)
    canvas = np.full((len(rows) * th + padding, cols * tw + padding, c), pad_value, np.uint8)
    for r, row in enumerate(rows):
        for k, img in enumerate(row):
            top, left = padding + r * th, padding + k * tw
            canvas[top:top + h * scale, left:left + w * scale] = img.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas


def _check(images: np.ndarray) -> np.ndarray:
    """uint8 images as (N, H, W, C); (N, H, W) gets a channel axis."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise LddpmError(f"a grid needs uint8 images of shape (N, H, W, C), got {images.dtype} {images.shape}")
    return images


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) row-major, `nrow` per row, `padding` pixels between."""
    images = _check(images)
    n, h, w, c = images.shape
    if n == 0:
        return np.full((h + 2 * padding, w + 2 * padding, c), pad_value, np.uint8)
    nrow = max(1, min(int(nrow), n))
    return tile_rows([list(images[i:i + nrow]) for i in range(0, n, nrow)], padding=padding, pad_value=pad_value)


def labelled_grid(images: np.ndarray, labels: np.ndarray | None, *, per_class: int = 8, max_images: int = 64,
                  class_names: list[str] | None = None, padding: int = 2) -> np.ndarray:
    """An RGB grid on white: one row per class (named when `class_names` is given) or a square of images.

    Images smaller than 64 pixels are upscaled by an integer factor so a person can see them.
    """
    images = _check(images)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, _ = images.shape
    row_names = None
    if labels is not None and len(labels) == n:
        labels = np.asarray(labels)
        classes = sorted(int(c) for c in np.unique(labels))
        rows = [[images[i] for i in np.flatnonzero(labels == c)[:per_class]] for c in classes]
        if class_names:
            row_names = [class_names[c] if c < len(class_names) else str(c) for c in classes]
    else:
        k = min(n, max_images)
        cols = max(1, int(math.ceil(math.sqrt(k))))
        rows = [list(images[i:i + cols]) for i in range(0, k, cols)]
    scale = max(1, 64 // max(h, w))
    canvas = tile_rows(rows, scale=scale, padding=padding, pad_value=255)
    if row_names:
        canvas = _add_row_names(canvas, row_names, h * scale + padding, padding)
    return canvas


def _add_row_names(canvas: np.ndarray, names: list[str], row_height: int, pad: int, wrap: int = 28) -> np.ndarray:
    """Prepend a white margin with each row's name (long names, e.g. prompts, wrapped onto several lines)."""
    import textwrap

    from PIL import Image, ImageDraw

    lines = [textwrap.wrap(name, wrap) or [""] for name in names]
    width = 8 + 7 * max(len(line) for block in lines for line in block)
    out = Image.new("RGB", (canvas.shape[1] + width, canvas.shape[0]), "white")
    out.paste(Image.fromarray(canvas), (width, 0))
    draw = ImageDraw.Draw(out)
    for r, block in enumerate(lines):
        top = pad + r * row_height + row_height // 2 - 6 * len(block)
        for k, line in enumerate(block):
            draw.text((4, top + 12 * k), line, fill=(0, 0, 0))
    return np.asarray(out)


def prompt_grid(images: np.ndarray, prompts: list[str], *, per_prompt: int = 8) -> np.ndarray:
    """An RGB grid with one row per distinct prompt (in order of first use), labelled with the prompt."""
    unique = list(dict.fromkeys(prompts))
    rows = np.array([unique.index(p) for p in prompts])
    return labelled_grid(images, rows, per_class=per_prompt, class_names=unique)


def masked_view(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W, C) with the pixels to regenerate (mask true, (N or 1, H, W)) painted white."""
    images = _check(images)
    masks = np.asarray(masks).astype(bool)
    masks = masks.reshape(-1, *images.shape[1:3])
    view = images.copy()
    view[np.broadcast_to(masks, images.shape[:3])] = 255
    return view


def comparison_grid(columns: list[np.ndarray], *, padding: int = 2) -> np.ndarray:
    """Side-by-side rows on white, one per image: columns[0][i] | columns[1][i] | ... (e.g. input | mask | output).

    Every column is uint8 (N, H, W, C) of one size; grey and RGB columns may be mixed (grey is repeated).
    Images smaller than 64 pixels are upscaled by an integer factor.
    """
    columns = [_check(c) for c in columns]
    if len({c.shape[:3] for c in columns}) != 1:
        raise LddpmError(f"comparison columns differ in size: {[c.shape for c in columns]}")
    if len({c.shape[3] for c in columns}) > 1:
        columns = [np.repeat(c, 3, axis=-1) if c.shape[3] == 1 else c for c in columns]
    n, h, w, _ = columns[0].shape
    scale = max(1, 64 // max(h, w))
    return tile_rows([[c[i] for c in columns] for i in range(n)], scale=scale, padding=padding, pad_value=255)


def save_grid(images: np.ndarray, path: str | Path, nrow: int = 8) -> Path:
    """Write uint8 images (N, H, W, C) as one PNG grid with `nrow` images per row (atomically)."""
    return write_png(path, make_grid(images, nrow))
