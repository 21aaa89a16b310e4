"""How good layer-wise retrieval is: how often it finds images of the query's class, and how much of the exact
search's top-k a bundle's index finds (its recall, the number that says whether the galleries are faithful)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import image_batches
from ..model.clt import CrossLayerTranscoder
from ..model.teacher import Teacher
from .compact import recall_at
from .exact import exact_neighbours, image_descriptors
from .index import DESCRIPTOR_TOKENS, RetrievalIndex, descriptors


@torch.no_grad()
def same_class_rates(teacher: Teacher, clt: CrossLayerTranscoder, index: RetrievalIndex, labels: Sequence[int],
                     queries: Dataset, n_queries: int, k: int = 3, batch_size: int = 64) -> dict[str, list[float]]:
    """Per token set and layer: the share of the top-k retrieved images (labels[row]) that have the class of
    the query, over the first ``n_queries`` images of a held-out dataset."""
    hits = {tokens: np.zeros(index.n_layers) for tokens in DESCRIPTOR_TOKENS}
    n_queries = min(n_queries, len(queries))
    for pixels, query_labels, _ in image_batches(queries, teacher.preprocess, batch_size, range(n_queries),
                                                     device=teacher.device):
        found = index.search(descriptors(clt.encode_sparse(teacher.capture(pixels).xs)), k)
        for tokens, per_layer in found.items():
            for layer, results in per_layer.items():
                hits[tokens][layer] += sum(labels[h.image_id] == int(q) for q, row in zip(query_labels, results)
                                           for h in row)
    return {tokens: (counts / (n_queries * k)).tolist() for tokens, counts in hits.items()}


def index_recall(index: RetrievalIndex, query: dict[str, np.ndarray],
                 exact: dict[str, list[tuple[np.ndarray, np.ndarray]]], k: int = 10) -> dict[str, list[float]]:
    """Per token set and layer: recall@k of ``index`` for query descriptors {tokens: [L, Q, F]} against their exact
    top-k (as :class:`~.exact.ExactTopK` gives it)."""
    found = index.search({tokens: [torch.from_numpy(d) for d in per_layer] for tokens, per_layer in query.items()}, k)
    return {tokens: [recall_at(exact[tokens][layer][1].tolist(), [[h.image_id for h in row] for row in rows], k)
                     for layer, rows in per_layer.items()] for tokens, per_layer in found.items()}


@torch.no_grad()
def recall_against_exact(teacher: Teacher, clt: CrossLayerTranscoder, index: RetrievalIndex, corpus: Dataset,
                         corpus_indices: Sequence[int], queries: Dataset, n_queries: int, k: int = 10,
                         batch_size: int = 64, progress: bool = True) -> dict[str, list[float]]:
    """Per token set and layer: recall@k of ``index`` against exact cosine search over the same descriptors of
    ``corpus[corpus_indices]`` (row r is corpus_indices[r]), for the first ``n_queries`` held-out images."""
    pixels = held_out_pixels(teacher, queries, n_queries, batch_size)
    reference = exact_neighbours(teacher, clt, corpus, corpus_indices, pixels, k, batch_size, progress=progress)
    return index_recall(index, image_descriptors(teacher, clt, pixels), reference, k)


def held_out_pixels(teacher: Teacher, queries: Dataset, n_queries: int, batch_size: int = 64) -> torch.Tensor:
    """The first ``n_queries`` images of a held-out dataset, preprocessed for the teacher."""
    indices = range(min(n_queries, len(queries)))
    return torch.cat([pixels for pixels, _, _ in image_batches(queries, teacher.preprocess, batch_size, indices)])
