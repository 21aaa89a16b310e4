"""Building a CLT's retrieval indexes in one pass over the corpus: descriptors of every image, spooled into the
exact or the compact index of each (token set, layer), and the exact top-10 of a few held-out images, so that the
index's recall is measured on the bundle's own codes while it is built."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import image_batches
from ..model.clt import CrossLayerTranscoder
from ..model.teacher import Teacher
from ..progress import tqdm
from .compact import CompactBuilder, coarse_entries, fine_bytes, spread_rows, whole_row_bytes
from .exact import ExactTopK, image_descriptors
from .index import DESCRIPTOR_TOKENS, MODES, ExactIndex, RetrievalIndex
from .quality import index_recall


class _DenseSpool:
    """Dense descriptors of one (token set, layer) gathered batch by batch in a float32 memory map on disk (never
    all dense layers in RAM): indexed exactly at the end, or read as a compact index's sample."""

    def __init__(self, n_images: int, n_features: int, workdir: Path, name: str):
        self.dense = np.lib.format.open_memmap(workdir / f"{name}.npy", "w+", np.float32, (n_images, n_features))
        self.row = 0

    def add(self, batch: np.ndarray) -> None:
        self.dense[self.row:self.row + batch.shape[0]] = batch
        self.row += batch.shape[0]

    def finish(self) -> ExactIndex:
        return ExactIndex.build(self.dense)


COMPACT_DEFAULTS = {"budget": 0.1, "min_bytes": 32 * 2**20, "coarse_keep": 128, "coarse_share": 0.125,
                    "query_keep": 2048, "candidates": 500, "head_share": 0.1, "directions": 32, "sample": 1024}


def index_settings(mode: str, **compact) -> dict:
    """The settings an index of ``mode`` is built with and records: ``COMPACT_DEFAULTS`` with ``compact`` over them,
    none for an exact index."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    unknown = set(compact) - set(COMPACT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown compact index settings {sorted(unknown)}; known: {sorted(COMPACT_DEFAULTS)}")
    return {**COMPACT_DEFAULTS, **compact} if mode == "compact" else {}


def compact_coarse_entries(n_images: int, n_features: int, settings: dict) -> int:
    """Coarse entries per image of a compact index with the given ``COMPACT_DEFAULTS``-style settings."""
    return coarse_entries(n_images, n_features, settings["budget"], settings["min_bytes"], settings["coarse_keep"],
                          settings["coarse_share"])


def compact_fine_bytes(n_images: int, n_features: int, settings: dict) -> int:
    """Fine-tier bytes per image of a compact index with the given ``COMPACT_DEFAULTS``-style settings."""
    return fine_bytes(n_images, n_features, settings["budget"], settings["min_bytes"],
                      compact_coarse_entries(n_images, n_features, settings))


def needs_sample(n_images: int, n_features: int, settings: dict) -> bool:
    """Whether rows of such an index may lose entries, so that its builder learns from a sample."""
    return compact_fine_bytes(n_images, n_features, settings) < whole_row_bytes(n_features)


def compact_builder(n_images: int, n_features: int, settings: dict, workdir: Path, name: str,
                    sample: np.ndarray | None = None) -> CompactBuilder:
    """A builder of the compact index of ``n_images`` descriptors with the given ``COMPACT_DEFAULTS``-style settings,
    learning from ``sample`` (descriptors spread over the corpus) where rows may lose entries."""
    return CompactBuilder(n_images, n_features, compact_fine_bytes(n_images, n_features, settings), workdir, name,
                          sample, compact_coarse_entries(n_images, n_features, settings), settings["query_keep"],
                          settings["candidates"], settings["head_share"], settings["directions"])


def _sample_descriptors(teacher: Teacher, clt: CrossLayerTranscoder, dataset: Dataset, indices: Sequence[int],
                        count: int, batch_size: int, num_workers: int, workdir: Path) -> dict[str, list[np.ndarray]]:
    """Descriptors of ``count`` images spread evenly over ``indices`` (a corpus may come in class order), per token
    set and layer, in memory maps under ``workdir``."""
    chosen = [indices[i] for i in spread_rows(len(indices), count)]
    c = clt.config
    spools = {tokens: [_DenseSpool(len(chosen), c.n_features, workdir, f"sample_{tokens}{layer}")
                       for layer in range(c.n_layers)] for tokens in DESCRIPTOR_TOKENS}
    for pixels, _, _ in image_batches(dataset, teacher.preprocess, batch_size, chosen, num_workers,
                                      teacher.device):
        for tokens, per_layer in image_descriptors(teacher, clt, pixels).items():
            for layer, rows in enumerate(per_layer):
                spools[tokens][layer].add(rows)
    return {tokens: [spool.dense for spool in per_layer] for tokens, per_layer in spools.items()}


@torch.no_grad()
def build_retrieval(teacher: Teacher, clt: CrossLayerTranscoder, dataset: Dataset, indices: Sequence[int],
                    mode: str = "compact", batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                    recall_queries: torch.Tensor | None = None, **compact) -> RetrievalIndex:
    """Stream ``dataset[indices]`` through teacher and CLT and index its descriptors (row r = indices[r]). The
    compact mode's settings (``COMPACT_DEFAULTS``): the whole index may take ``budget`` x the exact index's bytes,
    or ``min_bytes`` per index when that is more (so small corpora keep every entry), the coarse tier keeps
    ``coarse_keep`` entries per image, on at most ``coarse_share`` of those bytes, a query uses its ``query_keep``
    largest entries to find ``candidates`` images that the fine tier ranks; a fine row that cannot keep every entry
    in float16 spends at least ``head_share`` of its bytes on its largest entries in float16, and then the index
    learns its common features and ``directions`` correction directions from the descriptors of ``sample`` images
    spread over the corpus, computed first. With ``recall_queries`` (preprocessed held-out images), the same pass
    finds their exact top-10 and the index's settings record its recall@10 against it (per token set and layer)."""
    settings = index_settings(mode, **compact)
    c, n = clt.config, len(indices)
    with tempfile.TemporaryDirectory(prefix="clt-retrieval-") as workdir:
        sample = None
        if mode == "compact" and needs_sample(n, c.n_features, settings):
            sample = _sample_descriptors(teacher, clt, dataset, indices, settings["sample"], batch_size, num_workers,
                                         Path(workdir))

        def spool(tokens: str, layer: int):
            if mode == "exact":
                return _DenseSpool(n, c.n_features, Path(workdir), f"{tokens}{layer}")
            return compact_builder(n, c.n_features, settings, Path(workdir), f"{tokens}{layer}",
                                   None if sample is None else sample[tokens][layer])

        spools = {tokens: [spool(tokens, layer) for layer in range(c.n_layers)] for tokens in DESCRIPTOR_TOKENS}
        query = None if recall_queries is None else image_descriptors(teacher, clt, recall_queries)
        exact = None if query is None else ExactTopK(query, 10)
        batches = image_batches(dataset, teacher.preprocess, batch_size, indices, num_workers, teacher.device)
        for pixels, _, _ in tqdm(batches, desc=f"indexing {c.sparsifier} codes", disable=not progress):
            batch = image_descriptors(teacher, clt, pixels)
            for tokens, per_layer in batch.items():
                for layer, rows in enumerate(per_layer):
                    spools[tokens][layer].add(rows)
            if exact is not None:
                exact.add(batch)
        index = RetrievalIndex({tokens: [s.finish() for s in per_layer] for tokens, per_layer in spools.items()},
                               mode, settings)
    if exact is not None:
        index.settings["recall_at_10"] = index_recall(index, query, exact.result())
        index.settings["recall_queries"] = len(recall_queries)
    return index
