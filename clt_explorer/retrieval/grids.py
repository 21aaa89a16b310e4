"""Static layer-wise retrieval grids like the paper's figures 4 and 5: for a few fixed query images, the top-K
training images of every layer by exact cosine search over the CLS code or the patch-mean code.

The search is exact and streams the corpus: each batch of corpus descriptors is searched with FAISS's brute-force
inner product (``faiss.knn``) and merged into a running top-K (``faiss.ResultHeap``), so memory holds one batch,
not the 2.4 GB per layer that a flat index of 50k ViT-B descriptors would need.
"""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..data import image_batches
from ..model.clt import CrossLayerTranscoder
from ..model.teacher import Teacher
from ..model.tokens import CLS
from ..progress import tqdm
from .index import DESCRIPTOR_TOKENS, descriptors
from .thumbnails import ThumbnailStore

DESCRIPTOR_TITLES = {CLS: "CLS code", "patches": "patch-mean code"}


@torch.no_grad()
def image_descriptors(teacher: Teacher, clt: CrossLayerTranscoder, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """Per token group: descriptors [L, B, F] of a preprocessed batch (normalised, float32)."""
    found = descriptors(clt.encode_sparse(teacher.capture(pixels.to(teacher.device)).xs))
    return {tokens: torch.stack(per_layer).float().cpu().numpy() for tokens, per_layer in found.items()}


@torch.no_grad()
def exact_neighbours(teacher: Teacher, clt: CrossLayerTranscoder, corpus: Dataset, corpus_indices: Sequence[int],
                     queries: torch.Tensor, k: int = 3, batch_size: int = 64, progress: bool = True
                     ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """result[tokens][layer] = (scores [Q, k], rows [Q, k]) over ``corpus[corpus_indices]`` (row r is
    corpus_indices[r], as in a bundle's thumbnails), for preprocessed query images [Q, 3, H, W]."""
    query = image_descriptors(teacher, clt, queries)
    n_layers, n_queries = next(iter(query.values())).shape[:2]
    heaps = {tokens: [faiss.ResultHeap(n_queries, k, keep_max=True) for _ in range(n_layers)]
             for tokens in DESCRIPTOR_TOKENS}
    offset = 0
    batches = image_batches(corpus, teacher.preprocess, batch_size, corpus_indices)
    for pixels, _, _ in tqdm(batches, desc="exact search over the corpus", disable=not progress):
        batch = image_descriptors(teacher, clt, pixels)
        for tokens, per_layer in heaps.items():
            for layer, heap in enumerate(per_layer):
                scores, rows = faiss.knn(np.ascontiguousarray(query[tokens][layer]),
                                         np.ascontiguousarray(batch[tokens][layer]), min(k, pixels.shape[0]),
                                         metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result(scores, rows + offset)
        offset += pixels.shape[0]
    for per_layer in heaps.values():
        for heap in per_layer:
            heap.finalize()
    return {tokens: [(heap.D, heap.I) for heap in per_layer] for tokens, per_layer in heaps.items()}


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
