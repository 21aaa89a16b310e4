"""The compact retrieval index: cosine search over sparse descriptors in two tiers, both memory-mapped.

- coarse: each descriptor's ``coarse_keep`` largest entries, 8-bit with a per-row scale, in a CSC matrix whose
  columns are features (row ids in 16 bits up to 65,536 images). A query scores every image through the columns of
  its own ``query_keep`` largest entries and keeps the ``candidates`` best: this only has to find the true
  neighbours among a few hundred, not to rank them. Where the index has correction directions U
  (:mod:`.fine_codec`), each image also stores its projection U^T x, a query scores it with U^T q, and the
  sparse entries are those of what lies outside span U: real codes share their largest entries (the demo's top
  16 are 91-96% common features), so these alone hardly tell images apart.
- fine: each descriptor in a fixed number of bytes (:mod:`.fine_rows`): every entry in float16 when they fit, else
  its largest ones in float16 and as many of the next ones as fit at 3-4 bits, with a correction of what that loses
  along a few directions learnt from a sample (:mod:`.fine_codec`). The candidates are scored again against the
  whole query and the best k returned.

Descriptors are normalised with their full norm, so a fine score is the cosine less what the entries left out would
add and the rounding of the coded ones, both outside the correction directions: the exact cosine within float16
rounding when every entry fits.

On disk, a folder of .npy arrays (no pickles) and meta.json; ``FORMAT`` versions the layout. A loaded index reads
them through memory maps, whose pages :mod:`.mapped_pages` unmaps when they add up, except the candidates' fine rows,
which it reads from their file (:mod:`.row_file`).
"""

from __future__ import annotations

import math
import mmap
import shutil
from pathlib import Path
from typing import Sequence

import numba
import numpy as np
import scipy.sparse

from ..storage import AssetError, check_keys, read_json, write_json
from . import mapped_pages, row_file
from .fine_codec import fit_fine_codec, lossless_codec
from .fine_rows import (
    CODE_BITS,
    HEAD_GAP_MAX,
    HEAD_SLOT_BYTES,
    FineRows,
    common_block_bytes,
    decode_fine_rows,
    encode_fine_rows,
    fine_scores,
)

FORMAT = 5  # 1: one tier of truncated 8-bit entries; 2: fine entries all in float16; 3: no common block, no
# correction; 4: 4-bit tail codes only (all rebuilt automatically)
COARSE_BYTES_PER_ENTRY = 5  # an 8-bit value and an int32 row id (what the sizes assume; stored smaller, see below)
SHORT_ROW_IDS_UP_TO = 1 << 16  # images up to which the coarse tier stores its row ids as uint16 (int32 above): a
# search maps and reads 3 bytes an entry instead of 5
ROW_BYTES = 4 + 4 + 4 + 1 + 1  # per image: coarse scale, head slots, code scale, signedness, tail code bits


def top_entries(vectors: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` entries of largest magnitude of each row: (indices, values) [n, keep]."""
    keep = min(keep, vectors.shape[1])
    indices = np.argpartition(-np.abs(vectors), keep - 1, axis=1)[:, :keep]
    return indices, np.take_along_axis(vectors, indices, axis=1)


@numba.njit(nogil=True)
def column_sums(indptr, indices, data, columns, weights, n_rows):
    """sum_c weights[c] * column ``columns[c]`` of a CSC matrix (indptr, indices, data) of ``n_rows`` rows, as a dense
    float32 vector. The columns are read in place: scipy's column slice copied a query's ~1.2M entries before its
    product (true size at 10%: 2.2 ms a search against 1.3 ms here). Row ids outside the rows (a damaged file) are
    skipped, not written past the vector."""
    sums = np.zeros(n_rows, np.float32)
    for c in range(columns.shape[0]):
        column, weight = columns[c], weights[c]
        for entry in range(indptr[column], indptr[column + 1]):
            row = np.int64(indices[entry])
            if 0 <= row < n_rows:
                sums[row] += weight * np.float32(data[entry])
    return sums


def check_coarse(arrays: dict[str, np.ndarray], n_rows: int, n_features: int) -> None:
    """Raise ``ValueError`` where the coarse tier's columns (indptr, row ids, values) do not make an ``n_rows`` x
    ``n_features`` CSC matrix (without reading every row id: a loaded index maps only what its searches touch)."""
    indptr, indices, data = arrays["coarse_indptr"], arrays["coarse_indices"], arrays["coarse_data"]
    if indices.dtype not in (np.uint16, np.int32) or (indices.dtype == np.uint16 and n_rows > SHORT_ROW_IDS_UP_TO):
        raise ValueError(f"row ids of type {indices.dtype} for {n_rows} rows")
    if indptr.shape != (n_features + 1,) or indices.ndim != 1 or indices.shape != data.shape:
        raise ValueError(f"column pointers {indptr.shape}, row ids {indices.shape} and values {data.shape} do not "
                         f"make {n_features} columns")
    if indptr[0] != 0 or indptr[-1] != len(indices) or np.any(np.diff(indptr) < 0):
        raise ValueError("column pointers that do not run from 0 up to the entries' count")


FINE_ARRAYS = ("fine_rows", "head_count", "tail_scale", "tail_signed", "tail_bits")  # in the order of FineRows
PER_ROW_ARRAYS = ("coarse_scale", "projection", *FINE_ARRAYS, "correction")


class CompactIndex:
    """Two-tier cosine search; build it with :class:`CompactBuilder`."""

    suffix = ".compact"
    ARRAYS = ("coarse_data", "coarse_indices", "coarse_indptr", "common_features", "directions", *PER_ROW_ARRAYS)

    def __init__(self, arrays: dict[str, np.ndarray], n_features: int, query_keep: int, candidates: int):
        self.arrays, self.query_keep, self.candidates = arrays, query_keep, candidates
        self.shape = (arrays["coarse_scale"].shape[0], n_features)  # images x features
        check_coarse(arrays, *self.shape)
        self.fine_file: row_file.RowFile | None = None  # where a loaded index reads its fine rows from
        mapped_pages.register(self)

    @property
    def n_features(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    def __len__(self) -> int:
        return self.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows) per query [Q, F]: the fine tier ranks the coarse tier's candidates."""
        k = min(k, len(self))
        scores_out, rows_out = [], []
        for query in np.asarray(queries, dtype=np.float32):
            candidates = self.coarse_candidates(query, k)
            fine = self.rescore(candidates, query)
            best = np.argsort(-fine, kind="stable")[:k]
            scores_out.append(fine[best])
            rows_out.append(candidates[best])
        mapped_pages.searched()
        return np.stack(scores_out), np.stack(rows_out)

    def coarse_candidates(self, query: np.ndarray, k: int) -> np.ndarray:
        """The rows [max(k, candidates)] that the coarse tier scores highest for one query [F], in row order (mapped
        rows read in order)."""
        directions = self.arrays["directions"]
        along = query @ directions
        columns, weights = top_entries((query - directions @ along)[None], self.query_keep)
        active = weights[0] != 0
        coarse = self._coarse_scores(columns[0][active], weights[0][active])
        if len(along):
            coarse += self.arrays["projection"] @ along
        n_candidates = min(len(self), max(k, self.candidates))
        return np.sort(np.argpartition(-coarse, n_candidates - 1)[:n_candidates])

    def _coarse_scores(self, columns: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Every image's coarse score through the given feature columns."""
        a = self.arrays
        scores = column_sums(np.asarray(a["coarse_indptr"]), np.asarray(a["coarse_indices"]),
                             np.asarray(a["coarse_data"]), columns.astype(np.int64), weights.astype(np.float32),
                             len(self))
        return scores * a["coarse_scale"]

    def rescore(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """The fine tier's scores of images ``rows`` against one query [F]."""
        data = self.fine_file.rows(rows) if self.fine_file else self.arrays["fine_rows"][rows]
        fine = fine_scores(FineRows(data, *(self.arrays[name][rows] for name in FINE_ARRAYS[1:])), query,
                           self.arrays["common_features"])
        directions = self.arrays["directions"]
        if directions.shape[1]:
            fine += self.arrays["correction"][rows].astype(np.float32) @ (query @ directions)
        return fine

    def release_pages(self) -> None:
        """Unmap the pages of the index's files that searches touched (:mod:`.mapped_pages` says when); where mmap
        cannot (Windows), the system trims them itself."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for array in self.arrays.values():
            handle = getattr(array, "_mmap", None)  # numpy keeps the mmap object of a memmap here
            if handle is not None:
                handle.madvise(mmap.MADV_DONTNEED)

    def save(self, path: Path) -> None:
        """Write the arrays (numpy's format, no pickles) and meta.json into folder ``path``, atomically."""
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, array in self.arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        write_json(tmp / "meta.json", {"format": FORMAT, "shape": list(self.shape),
                                       "query_keep": self.query_keep, "candidates": self.candidates})
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)

    @classmethod
    def load(cls, path: Path) -> "CompactIndex":
        """Memory-map the arrays: only the pages that queries touch become resident."""
        meta = read_json(path / "meta.json")
        if meta.get("format") != FORMAT:
            raise AssetError(f"{path}: an index of format {meta.get('format', 1)}, this version reads {FORMAT}: "
                             f"build the bundle's retrieval step again")
        check_keys(meta, {"format", "shape", "query_keep", "candidates"}, set(), str(path / "meta.json"))
        try:
            arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in cls.ARRAYS}
        except (OSError, ValueError) as error:
            raise AssetError(f"{path}: unreadable index array ({error})") from error
        n, n_features = meta["shape"]
        if not all(arrays[name].shape[0] == n for name in PER_ROW_ARRAYS):
            raise AssetError(f"{path}: arrays of {n} rows expected, found {[a.shape for a in arrays.values()]}")
        if (arrays["directions"].shape != (n_features, arrays["correction"].shape[1])
                or arrays["projection"].shape != arrays["correction"].shape
                or np.any(arrays["common_features"] >= n_features)):
            raise AssetError(f"{path}: correction directions or common features do not match {n_features} features")
        slots = (arrays["fine_rows"].shape[1] - common_block_bytes(len(arrays["common_features"]))) // HEAD_SLOT_BYTES
        if slots < 0 or np.any(arrays["head_count"] > slots):
            raise AssetError(f"{path}: head slots past the fine rows' {arrays['fine_rows'].shape[1]} bytes")
        unknown = sorted(set(np.unique(arrays["tail_bits"]).tolist()) - set(CODE_BITS))
        if unknown:
            raise AssetError(f"{path}: tail codes of {unknown} bits; this version reads {CODE_BITS}")
        try:
            index = cls(arrays, n_features, int(meta["query_keep"]), int(meta["candidates"]))
            if row_file.AVAILABLE:
                index.fine_file = row_file.RowFile(path / "fine_rows.npy", arrays["fine_rows"])
        except ValueError as error:
            raise AssetError(f"{path}: inconsistent sparse index ({error})") from error
        return index


class CompactBuilder:
    """Streams descriptors into a :class:`CompactIndex`: ``fine_bytes`` per image for the fine tier, its rows and,
    when a ``sample`` of the descriptors (rows spread over the corpus) shows that rows lose entries, the projection
    on and correction along up to ``directions`` directions (at most a quarter of the bytes); in rows that do not
    fit whole, at least ``head_share`` of the row for float16 entries. The fine rows go to a memory map in
    ``workdir``, the coarse entries (a few per row) and the per-row numbers stay in memory."""

    def __init__(self, n_images: int, n_features: int, fine_bytes: int, workdir: Path, name: str,
                 sample: np.ndarray | None, coarse_keep: int, query_keep: int, candidates: int, head_share: float,
                 directions: int):
        self.n_images, self.n_features, self.row = n_images, n_features, 0
        self.coarse_keep, self.query_keep, self.candidates = min(coarse_keep, n_features), query_keep, candidates
        per_direction = 6 + 4 * n_features / max(1, n_images)  # per image: float32 and float16; float32 per feature
        affordable = int(fine_bytes / 4 / per_direction)  # beyond a quarter, the bytes rank as well in the rows
        self.codec = (lossless_codec(n_features) if sample is None
                      else fit_fine_codec(sample, fine_bytes, min(directions, affordable)))
        n_directions = self.codec.directions.shape[1]
        width = fine_bytes - math.ceil(n_directions * per_direction)
        self.head_keep = max(1, round(head_share * width / HEAD_SLOT_BYTES))
        self.fine = np.lib.format.open_memmap(workdir / f"{name}_fine.npy", "w+", np.uint8, (n_images, width))
        self.per_row = {"head_count": np.zeros(n_images, np.uint32), "tail_scale": np.zeros(n_images, np.float32),
                        "tail_signed": np.zeros(n_images, bool), "tail_bits": np.zeros(n_images, np.uint8),
                        "projection": np.zeros((n_images, n_directions), np.float32),  # float16 would cost ms
                        "correction": np.zeros((n_images, n_directions), np.float16)}
        self.coarse_indices = np.zeros((n_images, self.coarse_keep), np.int64)
        self.coarse_values = np.zeros((n_images, self.coarse_keep), np.float32)

    def add(self, batch: np.ndarray) -> None:
        rows = slice(self.row, self.row + batch.shape[0])
        common, directions = self.codec.common, self.codec.directions
        projection = batch @ directions
        outside = batch - projection @ directions.T if directions.shape[1] else batch  # no dense zeros to subtract
        self.coarse_indices[rows], self.coarse_values[rows] = top_entries(outside, self.coarse_keep)
        encoded = encode_fine_rows(batch, self.fine.shape[1], self.head_keep, common)
        self.fine[rows] = encoded.data
        for name in FINE_ARRAYS[1:]:
            self.per_row[name][rows] = getattr(encoded, name)
        if directions.shape[1]:
            self.per_row["projection"][rows] = projection
            decoded = decode_fine_rows(encoded, self.n_features, common)
            self.per_row["correction"][rows] = projection - decoded @ directions
        self.row += batch.shape[0]

    def finish(self) -> CompactIndex:
        """The index (its fine rows trimmed to the longest row actually used)."""
        used = max(1, int(np.flatnonzero(self.fine.any(0)).max(initial=-1)) + 1)
        values = self.coarse_values
        signed = bool((values < 0).any())
        levels, dtype = (127, np.int8) if signed else (255, np.uint8)
        scale = (np.abs(values).max(1) / levels).astype(np.float32)
        quantised = np.rint(values / np.where(scale > 0, scale, 1)[:, None]).astype(dtype)
        rows = np.repeat(np.arange(self.n_images), self.coarse_keep)
        matrix = scipy.sparse.csr_matrix((quantised.ravel(), (rows, self.coarse_indices.ravel())),
                                         shape=(self.n_images, self.n_features), dtype=dtype)
        matrix.eliminate_zeros()
        matrix = matrix.tocsc()
        row_ids = np.uint16 if self.n_images <= SHORT_ROW_IDS_UP_TO else np.int32
        arrays = {"coarse_data": matrix.data, "coarse_indices": matrix.indices.astype(row_ids),
                  "coarse_indptr": matrix.indptr.astype(np.int64), "coarse_scale": scale,
                  "common_features": self.codec.common.astype(np.int32), "directions": self.codec.directions,
                  "fine_rows": np.array(self.fine[:, :used]), **self.per_row}
        return CompactIndex(arrays, self.n_features, self.query_keep, self.candidates)


def coarse_entries(n_images: int, n_features: int, budget: float, min_bytes: int, coarse_keep: int,
                   share: float) -> int:
    """Coarse entries per image: ``coarse_keep``, on at most ``share`` of the bytes :func:`fine_bytes` starts from.

    Why the app's 128 entries on an eighth of the bytes, a query's 2,048 entries and 500 candidates
    (``scripts/bench_retrieval.py``, patch means at 10%): on synthetic codes at true size, whose neighbours stand out
    little, the fine tier alone would rank 0.994 of the exact top 10, but 64 entries, a query's 512 and 300 candidates
    found 0.867; these settings find 0.959 (a quarter of the bytes and 300 candidates: 0.970). The demo's real codes,
    rebuilt in true-size proportions, rank by the fine bytes, their projection finding the candidates: 0.975-0.995
    with an eighth, 0.964-0.988 with a quarter. At 5% an eighth gave 0.870 on the synthetic codes, a quarter 0.796
    (fine rows of 4-bit tails; with 3-bit ones an eighth gives 0.889)."""
    allowed = _bytes_per_image(n_images, n_features, budget, min_bytes)
    return max(1, min(coarse_keep, n_features, int(share * allowed / COARSE_BYTES_PER_ENTRY)))


def fine_bytes(n_images: int, n_features: int, budget: float, min_bytes: int, coarse_keep: int) -> int:
    """Bytes per image for the fine tier (its row, projection and correction): what ``budget`` x the exact index's
    bytes (4 bytes per feature and image) leaves after ``coarse_keep`` coarse entries, or ``min_bytes`` for the whole
    index when that is more (small corpora keep every entry), never more than a row could need
    (:func:`whole_row_bytes`)."""
    row = int(_bytes_per_image(n_images, n_features, budget, min_bytes) - coarse_keep * COARSE_BYTES_PER_ENTRY
              - ROW_BYTES)
    return max(HEAD_SLOT_BYTES, min(row, whole_row_bytes(n_features)))


def _bytes_per_image(n_images: int, n_features: int, budget: float, min_bytes: int) -> float:
    """What the whole index may take per image: ``budget`` x the exact index's bytes, or ``min_bytes`` if more."""
    return max(budget * n_images * n_features * 4, min_bytes) / n_images


def whole_row_bytes(n_features: int) -> int:
    """Bytes with which any row keeps every entry: every feature in a float16 head slot, with the slots of its gaps."""
    return HEAD_SLOT_BYTES * (n_features + n_features // HEAD_GAP_MAX + 1)


def spread_rows(n: int, count: int) -> np.ndarray:
    """``count`` (at most n) row numbers spread evenly over 0..n-1: a sample that a corpus in class order cannot
    bias."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))


def recall_at(reference: Sequence[Sequence[int]], found: Sequence[Sequence[int]], k: int) -> float:
    """Mean share of each reference top-k found in the other top-k."""
    return float(np.mean([len(set(r[:k]) & set(f[:k])) / k for r, f in zip(reference, found)]))
