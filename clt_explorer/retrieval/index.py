"""Layer-wise retrieval over CLT codes (supplement, section 7).

For every indexed image j and layer i there are two global descriptors of the codes z_i: the CLS
token's code, and the mean of the codes over the patch tokens. Similarity is the cosine (L2-
normalised descriptors, inner product); one index per (token set, layer).

Two modes:
- ``exact``: a FAISS ``IndexFlatIP`` over dense float32 descriptors (N x F x 4 bytes per index: the
  reference the tests compare against, too large for the app at 50k images x 12288 features);
- ``compact``: each descriptor keeps its ``keep`` entries of largest magnitude (the CLS code has at
  most k non-zeros, so keep = k is exact for it) in a scipy CSC matrix whose columns are features;
  a query multiplies only the columns of its own ``query_keep`` largest entries. Descriptors are
  normalised with their full norm, so scores are the exact cosine minus the truncated tails.
  See ``scripts/bench_retrieval.py`` for the sizes, speed and recall this gives.

On disk (a folder per CLT):  manifest.json + ``{tokens}_{layer:02d}.safetensors`` (compact) or
``.faiss`` (exact). Row r of every index is thumbnail id r.
"""

from __future__ import annotations

import mmap
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import scipy.sparse
import torch
from torch.utils.data import Dataset

from ..data import image_batches
from ..model.clt import CrossLayerTranscoder
from ..model.sparsifiers import SparseCodes
from ..model.teacher import Teacher
from ..model.tokens import CLS, PATCHES, TOKEN_GROUPS, token_index
from ..progress import tqdm
from ..storage import AssetError, atomic_path, check_keys, read_json, write_json

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


def truncate(vectors: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` entries of largest magnitude of each row: (indices, values) [n, keep]."""
    keep = min(keep, vectors.shape[1])
    indices = np.argpartition(-np.abs(vectors), keep - 1, axis=1)[:, :keep]
    return indices, np.take_along_axis(vectors, indices, axis=1)


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


class SparseIndex:
    """Cosine search over truncated sparse descriptors: a scipy CSC matrix [N, F] of 8-bit values
    (int8 when descriptors can be negative, else uint8) with one float32 scale per image row, so that
    score_r = scale_r * sum_f q_f * value_rf. A query touches only the columns of its active features."""

    suffix = ".sparse"  # a folder of .npy arrays, memory-mapped when loaded
    ARRAYS = ("data", "indices", "indptr", "row_scale")

    def __init__(self, matrix: scipy.sparse.csc_matrix, row_scale: np.ndarray, query_keep: int,
                 maps: Sequence[np.memmap] = ()):
        self.matrix, self.row_scale, self.query_keep = matrix, row_scale, query_keep
        self._maps = maps

    def _release_pages(self) -> None:
        """Unmap the file pages the last search touched (they stay in the OS page cache): the process's
        resident memory then holds one query's pages at a time, not every page any query ever touched."""
        for array in self._maps:
            handle = getattr(array, "_mmap", None)  # numpy keeps the mmap object of a memmap here
            if handle is not None:
                handle.madvise(mmap.MADV_DONTNEED)

    @classmethod
    def build(cls, indices: np.ndarray, values: np.ndarray, n_features: int, query_keep: int) -> "SparseIndex":
        """From per-image (indices, values) [N, keep]; values are quantised to 8 bits per row."""
        n, keep = indices.shape
        signed = bool((values < 0).any())
        levels, dtype = (127, np.int8) if signed else (255, np.uint8)
        row_scale = (np.abs(values).max(1) / levels).astype(np.float32)
        quantised = np.rint(values / np.where(row_scale > 0, row_scale, 1)[:, None]).astype(dtype)
        rows = np.repeat(np.arange(n), keep)
        matrix = scipy.sparse.csr_matrix((quantised.ravel(), (rows, indices.ravel())), shape=(n, n_features),
                                         dtype=dtype)
        matrix.eliminate_zeros()
        return cls(matrix.tocsc(), row_scale, query_keep)

    @property
    def n_features(self) -> int:
        return self.matrix.shape[1]

    @property
    def nbytes(self) -> int:
        m = self.matrix
        return m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + self.row_scale.nbytes

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self))
        scores_out, ids_out = [], []
        for query in np.asarray(queries, dtype=np.float32):
            columns, weights = truncate(query[None], self.query_keep)
            keep = weights[0] != 0
            scores = np.asarray(self.matrix[:, columns[0][keep]] @ weights[0][keep]).ravel() * self.row_scale
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top], kind="stable")]
            scores_out.append(scores[top])
            ids_out.append(top)
        self._release_pages()
        return np.stack(scores_out), np.stack(ids_out)

    def save(self, path: Path) -> None:
        """Write the arrays (numpy's format, no pickles) and meta.json into folder ``path``, atomically."""
        m = self.matrix
        arrays = {"data": m.data, "indices": m.indices.astype(np.int32), "indptr": m.indptr.astype(np.int32),
                  "row_scale": self.row_scale}
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        write_json(tmp / "meta.json", {"shape": list(m.shape), "query_keep": self.query_keep})
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)

    @classmethod
    def load(cls, path: Path) -> "SparseIndex":
        """Memory-map the arrays: only the pages that queries touch become resident."""
        meta = read_json(path / "meta.json")
        check_keys(meta, {"shape", "query_keep"}, set(), str(path / "meta.json"))
        try:
            arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in cls.ARRAYS}
        except (OSError, ValueError) as error:
            raise AssetError(f"{path}: unreadable index array ({error})") from error
        n, n_features = meta["shape"]
        try:
            matrix = scipy.sparse.csc_matrix((arrays["data"], arrays["indices"], arrays["indptr"]),
                                             shape=(n, n_features), copy=False)
            matrix.check_format(full_check=False)
        except ValueError as error:
            raise AssetError(f"{path}: inconsistent sparse index ({error})") from error
        if arrays["row_scale"].shape != (n,):
            raise AssetError(f"{path}: {arrays['row_scale'].shape[0]} row scales for {n} rows")
        return cls(matrix, arrays["row_scale"], int(meta["query_keep"]), [arrays["data"], arrays["indices"]])


INDEX_TYPES = {"exact": ExactIndex, "compact": SparseIndex}


@dataclass
class Hit:
    """One retrieved image: its row (= thumbnail id) and cosine similarity."""

    image_id: int
    score: float


class RetrievalIndex:
    """One index per (token set, layer) for one CLT."""

    def __init__(self, indexes: dict[str, list[ExactIndex | SparseIndex]], mode: str, settings: dict | None = None):
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
        result[tokens][layer][query] is a list of hits, best first."""
        layers = range(self.n_layers) if layers is None else layers
        out: dict[str, dict[int, list[list[Hit]]]] = {}
        for tokens, per_layer in queries.items():
            out[tokens] = {}
            for layer in layers:
                scores, ids = self.indexes[tokens][layer].search(per_layer[layer].cpu().numpy(), k)
                out[tokens][layer] = [[Hit(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0]
                                      for row_s, row_i in zip(scores, ids)]
        return out

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        files = {}
        for tokens, per_layer in self.indexes.items():
            files[tokens] = []
            for layer, index in enumerate(per_layer):
                name = f"{tokens}_{layer:02d}{index.suffix}"
                index.save(folder / name)
                files[tokens].append(name)
        write_json(folder / MANIFEST, {"mode": self.mode, "n_images": self.n_images, "n_layers": self.n_layers,
                                       "n_features": self.indexes[CLS][0].n_features, "files": files,
                                       "settings": self.settings})

    @staticmethod
    def exists(folder: str | Path) -> bool:
        """Whether ``folder`` holds a saved index (its manifest is written last)."""
        return (Path(folder) / MANIFEST).is_file()

    @classmethod
    def load(cls, folder: str | Path, n_layers: int | None = None, n_features: int | None = None,
             n_images: int | None = None) -> "RetrievalIndex":
        """Load and check the indexes against the CLT's shape and the thumbnail count."""
        folder = Path(folder)
        where = str(folder / MANIFEST)
        manifest = read_json(folder / MANIFEST)
        check_keys(manifest, {"mode", "n_images", "n_layers", "n_features", "files"}, {"settings"}, where)
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


class _Spool:
    """Descriptors of one (token set, layer) gathered batch by batch: truncated rows in memory for the
    compact mode, a float32 memory map on disk for the exact mode (never all dense layers in RAM)."""

    def __init__(self, mode: str, n_images: int, n_features: int, keep: int, workdir: Path, name: str):
        self.mode, self.keep, self.row = mode, keep, 0
        if mode == "exact":
            self.dense = np.lib.format.open_memmap(workdir / f"{name}.npy", "w+", np.float32, (n_images, n_features))
        else:
            self.indices = np.zeros((n_images, keep), dtype=np.int64)
            self.values = np.zeros((n_images, keep), dtype=np.float32)

    def add(self, batch: np.ndarray) -> None:
        rows = slice(self.row, self.row + batch.shape[0])
        if self.mode == "exact":
            self.dense[rows] = batch
        else:
            self.indices[rows], self.values[rows] = truncate(batch, self.keep)
        self.row += batch.shape[0]

    def index(self, n_features: int, query_keep: int) -> ExactIndex | SparseIndex:
        if self.mode == "exact":
            index = ExactIndex.build(self.dense)
            del self.dense
            return index
        return SparseIndex.build(self.indices, self.values, n_features, query_keep)


def build_retrieval(teacher: Teacher, clt: CrossLayerTranscoder, dataset: Dataset, indices: Sequence[int],
                    mode: str = "compact", keep: dict[str, int] | None = None, query_keep: int | None = None,
                    batch_size: int = 64, num_workers: int = 0, progress: bool = True) -> RetrievalIndex:
    """Stream ``dataset[indices]`` through teacher and CLT and index its descriptors (row r = indices[r]).
    Compact mode keeps, per descriptor, ``keep`` entries (default k for CLS, which is exact, and 3.5 k
    for the patch mean) and uses a query's ``query_keep`` largest entries (default 8 k): at ViT-B/32
    scale that is under 5% of the exact index's bytes (scripts/bench_retrieval.py)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    c = clt.config
    keep = {CLS: c.k, PATCHES: 7 * c.k // 2, **(keep or {})}
    query_keep = query_keep or 8 * c.k
    with tempfile.TemporaryDirectory(prefix="clt-retrieval-") as workdir:
        spools = {tokens: [_Spool(mode, len(indices), c.n_features, keep[tokens], Path(workdir), f"{tokens}{layer}")
                           for layer in range(c.n_layers)] for tokens in DESCRIPTOR_TOKENS}
        batches = image_batches(dataset, teacher.preprocess, batch_size, indices, num_workers)
        with torch.no_grad():
            for pixels, _, _ in tqdm(batches, desc=f"indexing {c.sparsifier} codes", disable=not progress):
                codes = clt.encode_sparse(teacher.capture(pixels.to(teacher.device)).xs)
                for tokens, per_layer in descriptors(codes).items():
                    for layer, batch in enumerate(per_layer):
                        spools[tokens][layer].add(batch.cpu().numpy())
        indexes = {tokens: [spool.index(c.n_features, query_keep) for spool in per_layer]
                   for tokens, per_layer in spools.items()}
    return RetrievalIndex(indexes, mode, {"keep": keep, "query_keep": query_keep})


@torch.no_grad()
def same_class_rates(teacher: Teacher, clt: CrossLayerTranscoder, index: RetrievalIndex, labels: Sequence[int],
                     queries: Dataset, n_queries: int, k: int = 3, batch_size: int = 64) -> dict[str, list[float]]:
    """Per token set and layer: the share of the top-k retrieved images (labels[row]) that have the class of
    the query, over the first ``n_queries`` images of a held-out dataset."""
    hits = {tokens: np.zeros(index.n_layers) for tokens in DESCRIPTOR_TOKENS}
    n_queries = min(n_queries, len(queries))
    for pixels, query_labels, _ in image_batches(queries, teacher.preprocess, batch_size, range(n_queries)):
        found = index.search(descriptors(clt.encode_sparse(teacher.capture(pixels.to(teacher.device)).xs)), k)
        for tokens, per_layer in found.items():
            for layer, results in per_layer.items():
                hits[tokens][layer] += sum(labels[h.image_id] == int(q) for q, row in zip(query_labels, results)
                                           for h in row)
    return {tokens: (counts / (n_queries * k)).tolist() for tokens, counts in hits.items()}
