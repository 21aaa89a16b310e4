"""The compact index's fine tier: each descriptor in a fixed number of bytes, its largest entries in float16 (the
head) and as many of the next ones as fit at 4 bits (the tail), scored against a whole query.

A row of ``width`` bytes holds ``head_count`` head slots of 3 bytes (an 8-bit gap to the previous feature id, then a
float16 value, little-endian), then tail slots of one byte (a 4-bit gap to the previous tail feature id, then a
4-bit code of the value). A gap longer than its field takes extra slots that only move on (the longest gap, value or
code 0); padding is all zero bytes. Slot j of either part holds the feature at the sum of that part's gaps up to j.

Tail codes are even steps of the value up to the row's largest tail magnitude: 15 levels, or a sign and 7 levels in
rows with negative tail entries. A row whose entries all fit in head slots keeps them all (exact to float16, as the
demo bundle does). Any other row keeps ``head_keep`` head entries, or as many more as still leave room for a tail of
all the others, and as many of the others as fit in the tail.

Why (``scripts/bench_retrieval.py``; fine tier alone on the demo's real patch means, ReLU-TopK layers 1 / 3, at the
bytes per non-zero of a true-size row at 5%): a cosine scored from twice as many entries, most at 4 bits, ranks
closer to the exact one than half as many in float16 (0.85 / 0.89 of the exact top 10 against 0.57 / 0.66; 0.967
against 0.897 on the true-size synthetic codes). Even steps beat a square-root scale, finer for small values, by 4-5
points on real codes (large entries meet large query entries), and the largest entries still need float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HEAD_GAP_MAX, TAIL_GAP_MAX = 255, 15
HEAD_SLOT_BYTES = 3
HEAD_VALUE = np.dtype("<f2")  # little-endian float16, as stored
UNSIGNED_STEPS, SIGNED_STEPS = 15, 7
# value of code c (the row's tail scale times this): row 0 for rows of non-negative tail entries, row 1 for signed
TAIL_LEVELS = np.zeros((2, 16), np.float32)
TAIL_LEVELS[0, 1:] = np.arange(1, 16) / UNSIGNED_STEPS
TAIL_LEVELS[1, 1:8] = np.arange(1, 8) / SIGNED_STEPS
TAIL_LEVELS[1, 9:] = -TAIL_LEVELS[1, 1:8]


@dataclass
class FineRows:
    """Encoded rows: ``data`` [n, width] bytes; per row its head slots, tail scale and whether its tail is signed."""

    data: np.ndarray
    head_count: np.ndarray
    tail_scale: np.ndarray
    tail_signed: np.ndarray


def encode_fine_rows(vectors: np.ndarray, width: int, head_keep: int) -> FineRows:
    """Encode descriptors [n, F] into rows of ``width`` bytes (see the module docstring)."""
    n, n_features = vectors.shape
    by_magnitude, nnz = _by_magnitude(vectors)
    first, head_slots = np.zeros(n, np.int64), np.full(n, width // HEAD_SLOT_BYTES)
    whole = _slot_count(_take(by_magnitude, first, nnz, n_features), HEAD_GAP_MAX, n_features) <= head_slots
    head = np.where(whole, nnz, _head_count(by_magnitude, nnz, width, head_keep, n_features, whole))
    head_ids, head = _fit(by_magnitude, first, head, head_slots, HEAD_GAP_MAX, n_features)
    head_bytes = HEAD_SLOT_BYTES * _slot_count(head_ids, HEAD_GAP_MAX, n_features)
    tail_ids, _ = _fit(by_magnitude, head, nnz - head, width - head_bytes, TAIL_GAP_MAX, n_features)
    data = np.zeros((n, width), np.uint8)
    _write_head(data, vectors, head_ids)
    scale, signed = _write_tail(data, vectors, tail_ids, head_bytes)
    return FineRows(data, (head_bytes // HEAD_SLOT_BYTES).astype(np.uint32), scale, signed)


def fine_scores(rows: FineRows, query: np.ndarray) -> np.ndarray:
    """Inner products of a query [F] with encoded rows: exact to float16 over the head, to the codes over the tail."""
    n_features = len(query)
    data, head_count = rows.data, rows.head_count.astype(np.int64)
    n, width = data.shape
    widest = int(head_count.max(initial=0))
    head = data[:, :HEAD_SLOT_BYTES * widest].reshape(n, widest, HEAD_SLOT_BYTES)
    in_head = np.arange(widest) < head_count[:, None]
    features = np.minimum(np.cumsum(np.where(in_head, head[..., 0], 0), axis=1, dtype=np.int32), n_features - 1)
    values = np.ascontiguousarray(head[..., 1:]).view(HEAD_VALUE)[..., 0]
    scores = (query[features] * np.where(in_head, values, 0)).sum(1, dtype=np.float32)
    first = HEAD_SLOT_BYTES * int(head_count.min(initial=0))  # bytes before it are head slots in every row
    in_tail = np.arange(first, width) >= HEAD_SLOT_BYTES * head_count[:, None]
    tail = np.where(in_tail, data[:, first:], 0)
    features = np.minimum(np.cumsum(tail >> 4, axis=1, dtype=np.int32), n_features - 1)
    levels = np.take(TAIL_LEVELS.ravel(), (tail & 15) | (rows.tail_signed[:, None].astype(np.uint8) << 4))
    return scores + rows.tail_scale * (query[features] * levels).sum(1, dtype=np.float32)


def _head_count(by_magnitude: np.ndarray, nnz: np.ndarray, width: int, head_keep: int, n_features: int,
                whole: np.ndarray) -> np.ndarray:
    """Head entries of rows that do not fit ``whole``: the most (at least ``head_keep``) with which a tail of all the
    others still fits, searched by halving (more head entries take more bytes: 3 for a head slot, at most the slots
    of its gaps back from the tail); ``head_keep`` where even those leave too little for the whole tail."""
    def row_bytes(head: np.ndarray) -> np.ndarray:
        head_ids = _take(by_magnitude, np.zeros_like(head), head, n_features)
        tail_ids = _take(by_magnitude, head, nnz - head, n_features)
        return (HEAD_SLOT_BYTES * _slot_count(head_ids, HEAD_GAP_MAX, n_features)
                + _slot_count(tail_ids, TAIL_GAP_MAX, n_features))

    fits = np.minimum(nnz, head_keep)
    too_many = np.where(~whole & (row_bytes(fits) <= width), nnz, fits + 1)  # all of them in the head do not fit
    while (too_many - fits > 1).any():
        middle = (fits + too_many) // 2
        ok = row_bytes(middle) <= width
        fits, too_many = np.where(ok, middle, fits), np.where(ok, too_many, middle)
    return fits


def _write_head(data: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Head slots (gap, float16 value) of the entries ``ids`` at the start of each row."""
    gaps, at, features = _place(ids, HEAD_GAP_MAX, vectors.shape[1])
    values = np.zeros(gaps.shape, HEAD_VALUE)
    values[at] = vectors[at[0], features]
    slots = np.concatenate([gaps[..., None], values.view(np.uint8).reshape(*gaps.shape, 2)], axis=2)
    data[:, :slots.shape[1] * HEAD_SLOT_BYTES] = slots.reshape(len(data), -1)


def _write_tail(data: np.ndarray, vectors: np.ndarray, ids: np.ndarray, offset: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Tail slots (gap, code) of the entries ``ids`` from byte ``offset`` of each row; their scale and signedness."""
    gaps, at, features = _place(ids, TAIL_GAP_MAX, vectors.shape[1])
    values = np.zeros(gaps.shape, np.float32)
    values[at] = vectors[at[0], features]
    scale = np.abs(values).max(1, initial=0).astype(np.float32)
    signed = (values < 0).any(1)
    packed = (gaps << 4) | _tail_codes(values, scale, signed)
    columns = offset[:, None] + np.arange(packed.shape[1])
    inside = columns < data.shape[1]  # what lies beyond is padding
    data[np.nonzero(inside)[0], columns[inside]] = packed[inside]
    return scale, signed


def _tail_codes(values: np.ndarray, scale: np.ndarray, signed: np.ndarray) -> np.ndarray:
    """4-bit codes of tail values [n, m] in even steps up to their row's scale (0 for empty slots)."""
    relative = np.abs(values) / np.where(scale > 0, scale, 1)[:, None]
    steps = np.where(signed, SIGNED_STEPS, UNSIGNED_STEPS)[:, None]
    codes = np.rint(relative * steps).astype(np.uint8)
    return np.where(signed[:, None] & (values < 0) & (codes > 0), codes + 8, codes).astype(np.uint8)


def _by_magnitude(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feature ids of each row's non-zero entries, largest magnitude first ([n, max non-zeros], padded with F), and
    the number of non-zeros per row."""
    nnz = (vectors != 0).sum(1)
    keep = max(1, int(nnz.max(initial=0)))
    ids = np.argpartition(-np.abs(vectors), keep - 1, axis=1)[:, :keep]
    ids = np.take_along_axis(ids, np.argsort(-np.abs(np.take_along_axis(vectors, ids, 1)), axis=1, kind="stable"), 1)
    return np.where(np.arange(keep) < nnz[:, None], ids, vectors.shape[1]), nnz


def _take(by_magnitude: np.ndarray, start: np.ndarray, count: np.ndarray, n_features: int) -> np.ndarray:
    """Entries start..start+count of each row's magnitude order, sorted by feature id (padded with F)."""
    rank = np.arange(by_magnitude.shape[1])
    chosen = (rank >= start[:, None]) & (rank < (start + count)[:, None])
    return np.sort(np.where(chosen, by_magnitude, n_features), axis=1)


def _slot_count(ids: np.ndarray, gap_max: int, n_features: int) -> np.ndarray:
    """Slots that feature ids sorted per row (padded with F) need, with the extra slots of their long gaps."""
    valid = ids < n_features
    steps = np.diff(ids, axis=1, prepend=0)
    return (valid + np.where(valid, np.maximum(0, (steps - 1) // gap_max), 0)).sum(1)


def _fit(by_magnitude: np.ndarray, start: np.ndarray, count: np.ndarray, slots: np.ndarray, gap_max: int,
         n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """The most entries (of magnitude ranks start..start+count, so the largest first) that fit in ``slots`` slots per
    row: their ids sorted by feature, and their number per row. Fewer entries never take more slots, but leaving
    one out may free more than one (the extra slots of its long gap), so: drop as many as a row has slots too many
    until it fits, try adding back 1, 2, 4, ... while they fit, then halve the last step."""
    def fitting(counts: np.ndarray) -> np.ndarray:
        return _slot_count(_take(by_magnitude, start, counts, n_features), gap_max, n_features) <= slots

    fits = np.minimum(count, np.maximum(0, (by_magnitude < n_features).sum(1) - start))
    too_many = fits + 1
    while True:
        over = _slot_count(_take(by_magnitude, start, fits, n_features), gap_max, n_features) - slots
        if (over <= 0).all():
            break
        too_many = np.where(over > 0, fits, too_many)
        fits = np.where(over > 0, np.maximum(0, fits - over), fits)
    step = np.ones_like(fits)
    while (growing := fits + step < too_many).any():
        ok = growing & fitting(np.where(growing, fits + step, fits))
        too_many = np.where(growing & ~ok, fits + step, too_many)
        fits, step = np.where(ok, fits + step, fits), np.where(ok, 2 * step, step)
    while (too_many - fits > 1).any():
        middle = (fits + too_many) // 2
        ok = fitting(middle)
        fits, too_many = np.where(ok, middle, fits), np.where(ok, too_many, middle)
    return _take(by_magnitude, start, fits, n_features), fits


def _place(ids: np.ndarray, gap_max: int, n_features: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray],
                                                                     np.ndarray]:
    """Gaps [n, slots] for feature ids sorted per row, the (row, slot) of each entry and its feature id."""
    valid = ids < n_features
    steps = np.diff(ids, axis=1, prepend=0)
    pads = np.where(valid, np.maximum(0, (steps - 1) // gap_max), 0)
    slot = np.cumsum(pads + valid, axis=1) - 1
    used = (pads + valid).sum(1)
    gaps = np.where(np.arange(used.max(initial=0)) < used[:, None], gap_max, 0).astype(np.uint8)  # long-gap pads
    row, j = np.nonzero(valid)
    gaps[row, slot[row, j]] = steps[row, j] - pads[row, j] * gap_max  # each entry overwrites its own slot
    return gaps, (row, slot[row, j]), ids[row, j]
