"""The compact retrieval index: cosine search over sparse descriptors in two tiers, both memory-mapped.

- coarse: each descriptor's ``coarse_keep`` largest entries, 8-bit with a per-row scale, in a scipy CSC
  matrix whose columns are features. A query scores every image through the columns of its own
  ``query_keep`` largest entries and keeps the ``candidates`` best: this only has to find the true
  neighbours among a few hundred, not to rank them.
- fine: each descriptor's largest entries, as many as the byte budget allows (all of them when they fit):
  feature ids as 8-bit gaps to the previous id (a slot of gap 255 and value 0 only moves on) and values
  in float16. The candidates are scored again against the whole query and the best k returned.

Descriptors are normalised with their full norm, so a fine score is the cosine minus what the entries
left out would add, within float16 rounding: the exact cosine when every entry fits. Eight bits per
value are not enough here: on the demo bundle's real codes, 8-bit values of every entry lose 1-4
points of recall@10 against float16 (neighbours differ by very little), and float16 loses none.

On disk, a folder of .npy arrays (no pickles) and meta.json; ``FORMAT`` versions the layout.
"""

from __future__ import annotations

import mmap
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse

from ..storage import AssetError, check_keys, read_json, write_json

FORMAT = 2  # 1: one tier of truncated 8-bit entries (rebuilt automatically: it does not load)
GAP_MAX = 255
FINE_BYTES_PER_SLOT = 3  # an 8-bit gap and a float16 value
COARSE_BYTES_PER_ENTRY = 5  # an 8-bit value and an int32 row id


def top_entries(vectors: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` entries of largest magnitude of each row: (indices, values) [n, keep]."""
    keep = min(keep, vectors.shape[1])
    indices = np.argpartition(-np.abs(vectors), keep - 1, axis=1)[:, :keep]
    return indices, np.take_along_axis(vectors, indices, axis=1)


def encode_rows(vectors: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each descriptor's largest non-zero entries as (gaps uint8, values float16) [n, width], sorted by feature,
    with the slots that gaps longer than 255 need: as many entries as fit in ``width`` slots, the rest padding
    (gap 0, value 0). Slot j holds the feature at the sum of the gaps up to j."""
    n, n_features = vectors.shape
    keep = min(width, n_features)
    ids = np.argpartition(-np.abs(vectors), keep - 1, axis=1)[:, :keep]
    ids = np.sort(np.where(np.take_along_axis(vectors, ids, 1) != 0, ids, n_features), axis=1)  # zeros last
    valid = ids < n_features
    steps = np.diff(ids, axis=1, prepend=0)
    pads = np.where(valid, np.maximum(0, (steps - 1) // GAP_MAX), 0)
    slot = np.cumsum(pads + valid, axis=1) - 1  # the slot of each entry
    gaps, values = np.zeros((n, width), np.uint8), np.zeros((n, width), np.float16)
    fits = slot.max(1, initial=-1) < width
    rows = np.flatnonzero(fits)
    gaps[rows] = np.where(np.arange(width) < slot[rows].max(1, initial=-1)[:, None] + 1, GAP_MAX, 0)  # pads first
    r, j = np.nonzero(valid[rows])
    row, at = rows[r], slot[rows[r], j]
    gaps[row, at] = steps[row, j] - pads[row, j] * GAP_MAX  # then each entry overwrites its own slot
    values[row, at] = vectors[row, ids[row, j]]
    for row in np.flatnonzero(~fits):  # rare: long gaps push the row over its width; keep fewer entries
        strongest = np.argsort(-np.abs(vectors[row]), kind="stable")[:int(valid[row].sum())]
        n = len(strongest)
        while n > 0 and _slots(np.sort(strongest[:n])) > width:
            n -= 1
        fewer = np.zeros_like(vectors[row])
        fewer[strongest[:n]] = vectors[row, strongest[:n]]
        encoded = encode_rows(fewer[None], width)
        gaps[row], values[row] = encoded[0][0], encoded[1][0]
    return gaps, values


def _slots(ids: np.ndarray) -> int:
    """Slots that sorted feature ids need, with the pads of their long gaps."""
    steps = np.diff(ids, prepend=0)
    return len(ids) + int(np.maximum(0, (steps - 1) // GAP_MAX).sum())


class CompactIndex:
    """Two-tier cosine search; build it with :class:`CompactBuilder`."""

    suffix = ".compact"
    ARRAYS = ("coarse_data", "coarse_indices", "coarse_indptr", "coarse_scale", "fine_gaps", "fine_values")

    def __init__(self, arrays: dict[str, np.ndarray], n_features: int, query_keep: int, candidates: int):
        self.arrays, self.query_keep, self.candidates = arrays, query_keep, candidates
        n = arrays["coarse_scale"].shape[0]
        self.coarse = scipy.sparse.csc_matrix((arrays["coarse_data"], arrays["coarse_indices"],
                                               arrays["coarse_indptr"]), shape=(n, n_features), copy=False)

    @property
    def n_features(self) -> int:
        return self.coarse.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    def __len__(self) -> int:
        return self.coarse.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows) per query [Q, F]."""
        k = min(k, len(self))
        gaps, values = self.arrays["fine_gaps"], self.arrays["fine_values"]
        scores_out, rows_out = [], []
        for query in np.asarray(queries, dtype=np.float32):
            columns, weights = top_entries(query[None], self.query_keep)
            active = weights[0] != 0
            coarse = np.asarray(self.coarse[:, columns[0][active]] @ weights[0][active]).ravel()
            coarse *= self.arrays["coarse_scale"]
            n_candidates = min(len(self), max(k, self.candidates))
            candidates = np.sort(np.argpartition(-coarse, n_candidates - 1)[:n_candidates])  # sorted: mmap reads
            features = np.minimum(np.cumsum(gaps[candidates], axis=1, dtype=np.int64), self.n_features - 1)
            fine = (query[features] * values[candidates].astype(np.float32)).sum(1)
            best = np.argsort(-fine, kind="stable")[:k]
            scores_out.append(fine[best])
            rows_out.append(candidates[best])
        self._release_pages()
        return np.stack(scores_out), np.stack(rows_out)

    def _release_pages(self) -> None:
        """Unmap the file pages the last search touched (they stay in the OS page cache): the process's resident
        memory then holds one query's pages at a time, not every page any query ever touched."""
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
        write_json(tmp / "meta.json", {"format": FORMAT, "shape": list(self.coarse.shape),
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
        if not (arrays["coarse_scale"].shape == (n,) and arrays["fine_gaps"].shape[0] == n
                and arrays["fine_gaps"].shape == arrays["fine_values"].shape):
            raise AssetError(f"{path}: arrays of {n} rows expected, found {[a.shape for a in arrays.values()]}")
        try:
            index = cls(arrays, n_features, int(meta["query_keep"]), int(meta["candidates"]))
            index.coarse.check_format(full_check=False)
        except ValueError as error:
            raise AssetError(f"{path}: inconsistent sparse index ({error})") from error
        return index


class CompactBuilder:
    """Streams descriptors into a :class:`CompactIndex`: the fine tier goes to a memory map in ``workdir``, the
    coarse entries (a few per row) stay in memory. ``fine_width`` slots per row hold the fine tier."""

    def __init__(self, n_images: int, n_features: int, fine_width: int, workdir: Path, name: str,
                 coarse_keep: int = 64, query_keep: int = 512, candidates: int = 300):
        self.n_images, self.n_features, self.row = n_images, n_features, 0
        self.coarse_keep, self.query_keep, self.candidates = min(coarse_keep, n_features), query_keep, candidates
        self.gaps = np.lib.format.open_memmap(workdir / f"{name}_gaps.npy", "w+", np.uint8, (n_images, fine_width))
        self.values = np.lib.format.open_memmap(workdir / f"{name}_values.npy", "w+", np.float16,
                                                (n_images, fine_width))
        self.coarse_indices = np.zeros((n_images, self.coarse_keep), np.int64)
        self.coarse_values = np.zeros((n_images, self.coarse_keep), np.float32)

    def add(self, batch: np.ndarray) -> None:
        rows = slice(self.row, self.row + batch.shape[0])
        self.coarse_indices[rows], self.coarse_values[rows] = top_entries(batch, self.coarse_keep)
        self.gaps[rows], self.values[rows] = encode_rows(batch, self.gaps.shape[1])
        self.row += batch.shape[0]

    def finish(self) -> CompactIndex:
        """The index (its fine tier trimmed to the widest row actually used)."""
        occupied = ((self.gaps != 0) | (self.values != 0)).any(0)
        used = max(1, int(np.flatnonzero(occupied).max(initial=-1)) + 1)
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
        arrays = {"coarse_data": matrix.data, "coarse_indices": matrix.indices.astype(np.int32),
                  "coarse_indptr": matrix.indptr.astype(np.int64), "coarse_scale": scale,
                  "fine_gaps": np.array(self.gaps[:, :used]), "fine_values": np.array(self.values[:, :used])}
        return CompactIndex(arrays, self.n_features, self.query_keep, self.candidates)


def fine_width(n_images: int, n_features: int, budget: float, min_bytes: int, coarse_keep: int) -> int:
    """Slots per row of the fine tier: what ``budget`` x the exact index's bytes (4 bytes per feature and image)
    allows, or ``min_bytes`` for the whole index when that is more (small corpora keep every entry), never more
    than a row could need (every feature, with the slots of its gaps)."""
    allowed = max(budget * n_images * n_features * 4, min_bytes) / n_images
    slots = int((allowed - coarse_keep * COARSE_BYTES_PER_ENTRY - 4) // FINE_BYTES_PER_SLOT)
    return max(1, min(slots, n_features + n_features // GAP_MAX + 1))


def recall_at(reference: Sequence[Sequence[int]], found: Sequence[Sequence[int]], k: int) -> float:
    """Mean share of each reference top-k found in the other top-k."""
    return float(np.mean([len(set(r[:k]) & set(f[:k])) / k for r, f in zip(reference, found)]))
