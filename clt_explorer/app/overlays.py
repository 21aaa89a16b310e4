"""Heat overlays of a feature's activation per patch token on the image the model saw.

The patch grid covers what the teacher's preprocessing keeps of an image: the centred square of side min(w, h)
when it resizes the shortest side and crops (open_clip's default, ``resize_mode="shortest"``), the whole image
when it squashes it. Positive activations are drawn in red, negative ones (Abs-TopK) in blue, their opacity
proportional to |activation| / ``vmax``, so that overlays drawn with one ``vmax`` compare across images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

POSITIVE, NEGATIVE = (255, 40, 0), (0, 90, 255)
MAX_OPACITY = 0.7
CELL = 96  # pixels per image in a tile


def model_view(image: Image.Image, resize_mode: str = "shortest") -> Image.Image:
    """The part of ``image`` the patch grid covers."""
    image = image.convert("RGB")
    if resize_mode == "squash":
        return image
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def heat_overlay(image: Image.Image, patch_map: Sequence[float], grid: tuple[int, int], vmax: float,
                 size: int = CELL, resize_mode: str = "shortest") -> Image.Image:
    """``image`` as the model saw it, ``size`` pixels square, with ``patch_map`` (row-major over ``grid``) on top."""
    view = np.asarray(model_view(image, resize_mode).resize((size, size), Image.BICUBIC), dtype=np.float32)
    heat = np.asarray(patch_map, dtype=np.float32).reshape(grid) / max(vmax, 1e-12)
    upsampled = np.asarray(Image.fromarray(np.clip(heat, -1, 1)).resize((size, size), Image.BILINEAR))
    colour = np.where(upsampled[..., None] >= 0, np.array(POSITIVE, np.float32), np.array(NEGATIVE, np.float32))
    alpha = MAX_OPACITY * np.abs(upsampled)[..., None]
    return Image.fromarray(np.clip(view * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8))


def tile(images: Sequence[Image.Image], columns: int = 2, size: int = CELL) -> Image.Image:
    """Up to columns x columns images in a square, ``size`` pixels each, row by row, with a 2-pixel white gap
    (galleries show square items)."""
    side = columns * (size + 2) - 2
    out = Image.new("RGB", (side, side), "white")
    for i, image in enumerate(images[:columns * columns]):
        out.paste(image.resize((size, size)), ((i % columns) * (size + 2), (i // columns) * (size + 2)))
    return out
