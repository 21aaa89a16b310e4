"""Static layer-wise retrieval grids like the paper's figures 4 and 5: for a few fixed query images, the top-K
training images of every layer by exact cosine search (:mod:`.exact`) over the CLS code or the patch-mean code.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..model.tokens import CLS
from .thumbnails import ThumbnailStore

DESCRIPTOR_TITLES = {CLS: "CLS code", "patches": "patch-mean code"}


def retrieval_grid(query: Image.Image, neighbours: list[tuple[np.ndarray, np.ndarray]], query_row: int,
                   thumbnails: ThumbnailStore, classnames: list[str], title: str, cell: int = 96) -> Image.Image:
    """One figure: the query on the left, then one row per layer of its top-K training images, each captioned with
    its class and cosine similarity (the layout of the paper's figures 4 and 5)."""
    n_layers, k = len(neighbours), neighbours[0][1].shape[1]
    label_width, caption, header = 70, 14, 24
    width = label_width + cell + 16 + k * (cell + 6)
    height = header + n_layers * (cell + caption + 6)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), title, fill="black")
    canvas.paste(query.convert("RGB").resize((cell, cell)), (label_width, header))
    draw.text((label_width, header + cell + 2), "query", fill="black")
    for layer, (scores, rows) in enumerate(neighbours):
        y = header + layer * (cell + caption + 6)
        draw.text((6, y + cell // 2), f"layer {layer}", fill="black")
        for j in range(k):
            row = int(rows[query_row, j])
            if row < 0:  # fewer corpus images than k
                continue
            x = label_width + cell + 16 + j * (cell + 6)
            canvas.paste(thumbnails.image(row).convert("RGB").resize((cell, cell)), (x, y))
            name = classnames[thumbnails.labels[row]]
            draw.text((x, y + cell + 1), f"{name[:14]} {scores[query_row, j]:.2f}", fill="black")
    return canvas
