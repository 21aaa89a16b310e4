"""Procedurally drawn coloured shapes: the offline image-caption dataset.

100 classes = 10 colours x 10 shapes, drawn at a random position and size on a noisy background.
Image ``i`` of a split is a pure function of ``(seed, split, i)``, so the dataset is deterministic,
needs no storage and supports random access; train and test draw from disjoint seeds. A process keeps
the last ``RENDER_CACHE`` images it drew (12 KB each at 64 px): building a bundle visits the training
images several times (tiny CLIP, CLT epochs, thumbnails, indexes) and draws each once.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 30),
    "cyan": (40, 210, 220),
    "magenta": (215, 40, 200),
    "orange": (245, 130, 20),
    "purple": (110, 40, 160),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "frame", "semicircle", "bar")
CLASSNAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a drawing of a {}.",
    "an image of a {}.",
    "a {} on a noisy background.",
]
_SPLIT_IDS = {"train": 0, "test": 1}
RENDER_CACHE = 20_000


def _polygon(cx: float, cy: float, r: float, n: int, rotation: float, inner: float | None = None):
    """Vertices of a regular n-gon (or a star when ``inner`` gives the inner radius ratio)."""
    points = []
    steps = 2 * n if inner else n
    for j in range(steps):
        radius = r * (inner if inner and j % 2 else 1.0)
        angle = rotation + 2 * math.pi * j / steps
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw one shape of radius ``r`` centred on (cx, cy)."""
    box = (cx - r, cy - r, cx + r, cy + r)
    width = max(2, round(r / 3))
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r, 3, -math.pi / 2), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, 0.0), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, -math.pi / 2, inner=0.45), fill=fill)
    elif shape == "cross":
        t = r * 0.3
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=width)
    elif shape == "frame":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), outline=fill, width=width)
    elif shape == "semicircle":
        draw.pieslice((cx - r, cy - r * 0.6, cx + r, cy + r * 1.4), 180, 360, fill=fill)
    elif shape == "bar":
        draw.rectangle((cx - r, cy - r * 0.3, cx + r, cy + r * 0.3), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(label: int, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw class ``label`` with nuisance factors (position, size, colour jitter, background) from ``rng``."""
    colour = list(COLOURS.values())[label // len(SHAPES)]
    shape = SHAPES[label % len(SHAPES)]
    base = rng.uniform(70, 185, size=3)
    noise = rng.normal(0.0, rng.uniform(8, 28), size=(image_size, image_size, 3))
    background = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    r = rng.uniform(0.2, 0.36) * image_size
    cx, cy = rng.uniform(r, image_size - r, size=2)
    fill = tuple(int(c) for c in np.clip(np.array(colour) + rng.normal(0, 12, size=3), 0, 255))
    draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, fill)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.0)))
    return image


class SyntheticShapes(Dataset):
    """``n_images`` images of one split; item ``i`` is ``(PIL image, label)``; labels are balanced."""

    classnames = CLASSNAMES
    templates = TEMPLATES

    def __init__(self, split: str = "train", n_images: int = 20000, image_size: int = 64, seed: int = 0):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if n_images <= 0 or image_size < 8:
            raise ValueError(f"need n_images > 0 and image_size >= 8, got {n_images}, {image_size}")
        self.split, self.n_images, self.image_size, self.seed = split, n_images, image_size, seed
        self.labels = [i % len(CLASSNAMES) for i in range(n_images)]

    def __len__(self) -> int:
        return self.n_images

    def __getitem__(self, index: int):
        if not 0 <= index < self.n_images:
            raise IndexError(index)
        pixels = _drawn(self.seed, _SPLIT_IDS[self.split], index, self.labels[index], self.image_size)
        return Image.fromarray(pixels.copy(), "RGB"), self.labels[index]


@functools.lru_cache(maxsize=RENDER_CACHE)
def _drawn(seed: int, split_id: int, index: int, label: int, image_size: int) -> np.ndarray:
    """The pixels of one image (read-only: callers copy)."""
    pixels = np.asarray(render(label, np.random.default_rng([seed, split_id, index]), image_size))
    pixels.flags.writeable = False
    return pixels
