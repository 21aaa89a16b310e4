"""Exact cosine search over a corpus of images, streamed: the reference every retrieval index is measured against,
and the search behind the static retrieval grids.

Each batch of corpus descriptors is searched with FAISS's brute-force inner product (``faiss.knn``) and merged into
a running top-K (``faiss.ResultHeap``), so memory holds one batch, not the 2.4 GB per layer that a flat index of
50k ViT-B descriptors would need.
"""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import image_batches
from ..model.clt import CrossLayerTranscoder
from ..model.teacher import Teacher
from ..progress import tqdm
from .index import descriptors


@torch.no_grad()
def image_descriptors(teacher: Teacher, clt: CrossLayerTranscoder, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """Per token group: descriptors [L, B, F] of a preprocessed batch (normalised, float32)."""
    found = descriptors(clt.encode_sparse(teacher.capture(pixels).xs))
    return {tokens: torch.stack(per_layer).float().cpu().numpy() for tokens, per_layer in found.items()}


class ExactTopK:
    """The exact top-k of fixed queries over a corpus that arrives batch by batch, per token group and layer.
    ``query`` holds the queries' descriptors {tokens: [L, Q, F]}; rows are numbered in order of arrival."""

    def __init__(self, query: dict[str, np.ndarray], k: int):
        self.query, self.k, self.offset = query, k, 0
        n_layers, n_queries = next(iter(query.values())).shape[:2]
        self.heaps = {tokens: [faiss.ResultHeap(n_queries, k, keep_max=True) for _ in range(n_layers)]
                      for tokens in query}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """The next corpus rows' descriptors {tokens: [L, B, F]}."""
        n = next(iter(batch.values())).shape[1]
        for tokens, per_layer in self.heaps.items():
            for layer, heap in enumerate(per_layer):
                scores, rows = faiss.knn(np.ascontiguousarray(self.query[tokens][layer]),
                                         np.ascontiguousarray(batch[tokens][layer]), min(self.k, n),
                                         metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result(scores, rows + self.offset)
        self.offset += n

    def result(self) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """result[tokens][layer] = (scores [Q, k], rows [Q, k]), best first."""
        for per_layer in self.heaps.values():
            for heap in per_layer:
                heap.finalize()
        return {tokens: [(heap.D, heap.I) for heap in per_layer] for tokens, per_layer in self.heaps.items()}


@torch.no_grad()
def exact_neighbours(teacher: Teacher, clt: CrossLayerTranscoder, corpus: Dataset, corpus_indices: Sequence[int],
                     queries: torch.Tensor, k: int = 3, batch_size: int = 64, num_workers: int = 0,
                     progress: bool = True) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """result[tokens][layer] = (scores [Q, k], rows [Q, k]) over ``corpus[corpus_indices]`` (row r is
    corpus_indices[r], as in a bundle's thumbnails), for preprocessed query images [Q, 3, H, W]."""
    search = ExactTopK(image_descriptors(teacher, clt, queries), k)
    batches = image_batches(corpus, teacher.preprocess, batch_size, corpus_indices, num_workers, teacher.device)
    for pixels, _, _ in tqdm(batches, desc="exact search over the corpus", disable=not progress):
        search.add(image_descriptors(teacher, clt, pixels))
    return search.result()
