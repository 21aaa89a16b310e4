"""Layer-wise retrieval over CLT codes (supplement, section 7).

For every indexed image j and layer i there are two global descriptors of the codes z_i: the CLS
token's code, and the mean of the codes over the patch tokens. Similarity is the cosine (L2-
normalised descriptors, inner product); one index per (token set, layer).

Two modes:
- ``exact``: a FAISS ``IndexFlatIP`` over dense float32 descriptors (N x F x 4 bytes per index: the
  reference, too large for the app at 50k images x 12288 features);
- ``compact`` (the app's): the two-tier index of :mod:`.compact`, which keeps every entry of a
  descriptor in float16 when the byte budget allows (the demo bundle), and otherwise its largest ones in
  float16 and as many of the next ones as fit at 3-4 bits.
  ``scripts/bench_retrieval.py`` measures its recall, bytes and speed, on a bundle's real codes or on
  synthetic codes of the true size.

On disk (a folder per CLT): manifest.json + ``{tokens}_{layer:02d}.compact`` (folders of arrays) or
``.faiss`` files. Row r of every index is thumbnail id r.
"""

from __future__ import annotations

import functools
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import threadpoolctl
import torch

from ..model.sparsifiers import SparseCodes
from ..model.tokens import CLS, TOKEN_GROUPS, token_index
from ..storage import AssetError, atomic_path, check_keys, read_json, write_json
from .compact import FORMAT, CompactIndex

DESCRIPTOR_TOKENS = TOKEN_GROUPS  # the CLS code, and the mean of the patch codes
MODES = ("exact", "compact")
MANIFEST = "manifest.json"


def descriptors(codes: Sequence[SparseCodes]) -> dict[str, list[torch.Tensor]]:
    """Per token set, per layer: L2-normalised dense descriptors [B, F] of codes [B, T, m] per layer.
    ``cls`` is the CLS token's code; ``patches`` the mean of the patch tokens' codes."""
    out: dict[str, list[torch.Tensor]] = {tokens: [] for tokens in DESCRIPTOR_TOKENS}
    for c in codes:
        for tokens in DESCRIPTOR_TOKENS:
            selected = c.take_tokens(token_index(tokens))
            values, indices = selected.values.float(), selected.indices
            pooled = values.new_zeros(values.shape[0], c.n_features)
            pooled.scatter_add_(1, indices.flatten(1), values.flatten(1))
            pooled /= values.shape[1]
            out[tokens].append(torch.nn.functional.normalize(pooled, dim=-1))
    return out


class ExactIndex:
    """Cosine search with FAISS's flat inner-product index over normalised float32 descriptors."""

    suffix = ".faiss"

    def __init__(self, index: faiss.Index):
        self.index = index

    @classmethod
    def build(cls, vectors: np.ndarray) -> "ExactIndex":
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index)

    @property
    def n_features(self) -> int:
        return self.index.d

    @property
    def nbytes(self) -> int:
        return self.index.ntotal * self.index.d * 4

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self)))

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: Path) -> "ExactIndex":
        if not path.is_file():
            raise AssetError(f"{path}: file is missing")
        try:
            return cls(faiss.read_index(str(path)))
        except RuntimeError as error:
            raise AssetError(f"{path}: not a readable FAISS index ({error})") from error


INDEX_TYPES = {"exact": ExactIndex, "compact": CompactIndex}
# The 24 searches of one ViT-B/32 analysis (true size, 10%) took ~100 ms one at a time on 2 cores, ~60 ms two at a time.
SEARCH_THREADS = min(4, os.cpu_count() or 1)


@functools.cache
def _search_pool() -> ThreadPoolExecutor:
    """The threads every index's searches share (started on the first search)."""
    return ThreadPoolExecutor(SEARCH_THREADS, thread_name_prefix="retrieval")


@functools.cache
def _blas_controller() -> threadpoolctl.ThreadpoolController:
    """The BLAS libraries loaded by the first search (numpy's, faiss's), found once: finding them took ~4 ms a call."""
    return threadpoolctl.ThreadpoolController()


@dataclass
class Hit:
    """One retrieved image: its row (= thumbnail id) and cosine similarity."""

    image_id: int
    score: float


class RetrievalIndex:
    """One index per (token set, layer) for one CLT."""

    def __init__(self, indexes: dict[str, list[ExactIndex | CompactIndex]], mode: str, settings: dict | None = None):
        self.indexes, self.mode, self.settings = indexes, mode, settings or {}

    @property
    def n_layers(self) -> int:
        return len(self.indexes[CLS])

    @property
    def n_images(self) -> int:
        return len(self.indexes[CLS][0])

    @property
    def nbytes(self) -> int:
        return sum(index.nbytes for per_layer in self.indexes.values() for index in per_layer)

    def search(self, queries: dict[str, list[torch.Tensor]], k: int, layers: Sequence[int] | None = None
               ) -> dict[str, dict[int, list[list[Hit]]]]:
        """Top-k per token set and layer, for query descriptors as made by :func:`descriptors`:
        result[tokens][layer][query] is a list of hits, best first. The (token set, layer) searches run side by side
        on ``SEARCH_THREADS`` threads: a compact search runs compiled code without the GIL."""
        layers = range(self.n_layers) if layers is None else layers
        pairs = [(tokens, layer) for tokens in queries for layer in layers]

        def run(pair: tuple[str, int]) -> tuple[np.ndarray, np.ndarray]:
            tokens, layer = pair
            return self.indexes[tokens][layer].search(queries[tokens][layer].cpu().numpy(), k)

        # The searches' matrix-vector products are small; BLAS threads, once woken, spin after each call and held the
        # second core while torch's threads needed it (the next analysis's first torch ops waited ~50 ms on 2 cores).
        with _blas_controller().limit(limits=1, user_api="blas"):
            found = list(_search_pool().map(run, pairs))
        out: dict[str, dict[int, list[list[Hit]]]] = {tokens: {} for tokens in queries}
        for (tokens, layer), (scores, ids) in zip(pairs, found):
            out[tokens][layer] = [[Hit(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0]
                                  for row_s, row_i in zip(scores, ids)]
        return out

    def save(self, folder: str | Path) -> None:
        """Write every index and the manifest into a new folder that then replaces ``folder`` (nothing of an older
        index stays behind)."""
        folder = Path(folder)
        staging = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        files = {}
        for tokens, per_layer in self.indexes.items():
            files[tokens] = []
            for layer, index in enumerate(per_layer):
                name = f"{tokens}_{layer:02d}{index.suffix}"
                index.save(staging / name)
                files[tokens].append(name)
        write_json(staging / MANIFEST, {"format": FORMAT, "mode": self.mode, "n_images": self.n_images,
                                        "n_layers": self.n_layers, "n_features": self.indexes[CLS][0].n_features,
                                        "files": files, "settings": self.settings})
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)

    def built_with(self, mode: str, settings: dict) -> bool:
        """Whether this index was built in ``mode`` with ``settings`` (:func:`.build.index_settings`); what it records
        besides, such as its measured recall, does not count."""
        return self.mode == mode and all(self.settings.get(key) == value for key, value in settings.items())

    @staticmethod
    def exists(folder: str | Path) -> bool:
        """Whether ``folder`` holds a saved index of this version's format (its manifest is written last); an
        older one counts as none, so that the pipeline builds it again."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            return False
        try:
            return read_json(path).get("format") == FORMAT
        except AssetError:
            return False

    @classmethod
    def load(cls, folder: str | Path, n_layers: int | None = None, n_features: int | None = None,
             n_images: int | None = None) -> "RetrievalIndex":
        """Load and check the indexes against the CLT's shape and the thumbnail count."""
        folder = Path(folder)
        where = str(folder / MANIFEST)
        manifest = read_json(folder / MANIFEST)
        check_keys(manifest, {"format", "mode", "n_images", "n_layers", "n_features", "files"}, {"settings"}, where)
        if manifest["format"] != FORMAT:
            raise AssetError(f"{where}: indexes of format {manifest['format']}, this version reads {FORMAT}")
        if manifest["mode"] not in MODES:
            raise AssetError(f"{where}: unknown mode {manifest['mode']!r}")
        expected = {"n_layers": n_layers, "n_features": n_features, "n_images": n_images}
        for key, value in expected.items():
            if value is not None and manifest[key] != value:
                raise AssetError(f"{where}: {key} is {manifest[key]}, expected {value}")
        index_type = INDEX_TYPES[manifest["mode"]]
        indexes: dict[str, list] = {}
        for tokens in DESCRIPTOR_TOKENS:
            names = manifest["files"].get(tokens, [])
            if len(names) != manifest["n_layers"]:
                raise AssetError(f"{where}: {len(names)} {tokens} index files for {manifest['n_layers']} layers")
            indexes[tokens] = []
            for name in names:
                path = folder / Path(name).name  # file names only: nothing outside the folder
                index = index_type.load(path)
                if index.n_features != manifest["n_features"] or len(index) != manifest["n_images"]:
                    raise AssetError(f"{path}: index of {len(index)} x {index.n_features}, manifest says "
                                     f"{manifest['n_images']} x {manifest['n_features']}")
                indexes[tokens].append(index)
        return cls(indexes, manifest["mode"], manifest.get("settings"))
