"""The compact index's fine tier: each descriptor in a fixed number of bytes, its largest entries in float16 (the
head), the rest at 4 bits (the common block) or 3-4 bits (the tail), scored against a whole query.

A row of ``width`` bytes holds, in this order:

- the common block: a 4-bit code (low nibble first) for each of the index's common features, features active in
  most of its images, at a fixed place, so that they take no position bytes (0 where the entry is zero or in the
  head); empty when the index has none;
- ``head_count`` head slots of 3 bytes (an 8-bit gap to the previous feature id, then a float16 value,
  little-endian);
- tail slots of one byte, for entries of the other features: a gap to the previous tail feature id, then a code of
  the value; per row (``tail_bits``), a 4-bit gap and a 4-bit code, or a 5-bit gap and a 3-bit code.

A gap longer than its field takes extra slots that only move on (the longest gap, value or code 0); padding is all
zero bytes. Slot j of either part holds the feature at the sum of that part's gaps up to j.

Codes are even steps of the value up to the row's largest magnitude outside the head: 15 levels at 4 bits, 7 at 3, or
a sign and 7 or 3 levels in rows with negative entries there. A row whose entries all fit in head slots keeps them
all (exact to float16, as the demo bundle does). Any other row keeps ``head_keep`` head entries, or as many more as
still leave room for a tail of all the others, the common features it has beyond those, and as many of the others as
fit in the tail. A row whose entries left out then weigh more than its rounding (squared) is encoded with 3-bit tail
codes too, and keeps the encoding that loses less.

Why (``scripts/bench_retrieval.py``; fine tier alone on the demo's real patch means, ReLU-TopK layers 1 / 3, at the
bytes per non-zero of a true-size row at 5%): a cosine scored from twice as many entries, most at 4 bits, ranks
closer to the exact one than half as many in float16 (0.85 / 0.89 of the exact top 10 against 0.57 / 0.66; 0.967
against 0.897 on the true-size synthetic codes of a generator whose queries drew another layout). Even steps beat a
square-root scale, finer for small values, by 4-5 points on real codes (large entries meet large query entries), and
the largest entries still need float16. A common block holds most of a real patch mean's non-zeros in half the bytes
of tail slots. Where a row cannot keep every entry, the entries left out cost more than coarse codes: in a true-size
row at 5% (1,915 bytes), 4-bit codes kept ~1,420 of 2,581 non-zeros and what they left out weighed 9x their rounding,
19% of the tail slots holding no value (gaps longer than 15, padding). 3-bit codes with 5-bit gaps keep 1,740 and rank
0.937 of the exact top 10 among its first 100 (60 queries), against 0.895 (2-bit codes: 0.64-0.88). Rows that keep
everything rank better at 4 bits (at 10%: 0.992 against 0.975), hence the choice per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

HEAD_GAP_MAX = 255
HEAD_SLOT_BYTES = 3
HEAD_VALUE = np.dtype("<f2")  # little-endian float16, as stored
CODE_BITS = (4, 3)  # bits of a code: 4 in the common block; 4 or 3 in a tail slot, the rest of its byte the gap
NO_COMMON = np.zeros(0, np.int64)  # an index without common features


def _code_levels(bits: int) -> np.ndarray:
    """Signed step counts of the codes of ``bits`` bits [2, 16]: row 0 in rows of non-negative entries, row 1 in
    signed ones (the top bit a sign)."""
    codes = np.arange(16)
    sign = 1 << (bits - 1)
    valid = codes < 1 << bits
    return np.stack([codes * valid, np.where(codes & sign, sign - codes, codes) * valid]).astype(np.float32)


CODE_LEVELS = np.stack([_code_levels(bits) for bits in CODE_BITS])  # [CODE_BITS index, signed, code]
FLOAT16_VALUES = np.arange(1 << 16, dtype="<u2").view(HEAD_VALUE).astype(np.float32)  # each head value's, by its bits


@dataclass
class FineRows:
    """Encoded rows: ``data`` [n, width] bytes; per row its head slots, the scale of its codes, whether they are signed
    and the bits of its tail codes."""

    data: np.ndarray
    head_count: np.ndarray
    tail_scale: np.ndarray
    tail_signed: np.ndarray
    tail_bits: np.ndarray


def common_block_bytes(n_common: int) -> int:
    """Bytes of a common block: two 4-bit codes a byte."""
    return (n_common + 1) // 2


def fits_whole(vectors: np.ndarray, width: int) -> np.ndarray:
    """Rows [n, F] whose entries all fit in float16 head slots of ``width`` bytes."""
    return _whole(*_by_magnitude(vectors), width, vectors.shape[1])


def encode_fine_rows(vectors: np.ndarray, width: int, head_keep: int, common: np.ndarray = NO_COMMON) -> FineRows:
    """Encode descriptors [n, F] into rows of ``width`` bytes, with a common block for the sorted feature ids
    ``common``; each row's tail in the codes of ``CODE_BITS`` that lose less (see the module docstring)."""
    wide_bits, narrow_bits = CODE_BITS
    entries = _Entries(vectors, common)  # most of an encoding's time: both encodings share it
    rows, whole = _encode(vectors, entries, width, head_keep, common, wide_bits)
    coded = np.flatnonzero(~whole)  # rows with codes; the others are exact to float16
    if len(coded) == 0:
        return rows
    decoded = decode_fine_rows(_subset(rows, coded), vectors.shape[1], common)
    kept = decoded != 0
    left_out = (np.where(kept, 0, vectors[coded]) ** 2).sum(1)
    rounding = (np.where(kept, vectors[coded] - decoded, 0) ** 2).sum(1)
    # 3-bit codes round ~4.6x worse: only a row that leaves out more than it rounds can gain (and encoding is slow)
    worth_trying = left_out > rounding
    tried = coded[worth_trying]
    if len(tried):
        narrow, _ = _encode(vectors[tried], entries.rows(tried), width, head_keep, common, narrow_bits)
        narrow_lost = ((decode_fine_rows(narrow, vectors.shape[1], common) - vectors[tried]) ** 2).sum(1)
        better = narrow_lost < (left_out + rounding)[worth_trying]
        for name, array in vars(rows).items():
            array[tried[better]] = getattr(narrow, name)[better]
    return rows


def _subset(rows: FineRows, at: np.ndarray) -> FineRows:
    """Rows ``at`` of encoded rows."""
    return FineRows(*(array[at] for array in vars(rows).values()))


def _encode(vectors: np.ndarray, entries: _Entries, width: int, head_keep: int, common: np.ndarray, tail_bits: int
            ) -> tuple[FineRows, np.ndarray]:
    """Encode descriptors [n, F] (their ``entries``) into rows of ``width`` bytes whose tail codes have ``tail_bits``
    bits; and which rows fit whole in float16 head slots."""
    n, n_features = vectors.shape
    tail_gap_max = _gap_max(tail_bits)
    block = common_block_bytes(len(common))
    first, head_slots = np.zeros(n, np.int64), np.full(n, (width - block) // HEAD_SLOT_BYTES)
    whole = _whole(entries.by_magnitude, entries.nnz, width - block, n_features)
    head = np.where(whole, entries.nnz, _head_count(entries, width - block, head_keep, whole, tail_gap_max))
    head_ids, head = _fit(entries.by_magnitude, first, head, head_slots, HEAD_GAP_MAX, n_features)
    head_bytes = HEAD_SLOT_BYTES * _slot_count(head_ids, HEAD_GAP_MAX, n_features)
    tail_start = entries.rare_before(head)
    tail_ids, _ = _fit(entries.rare, tail_start, entries.n_rare - tail_start, width - block - head_bytes,
                       tail_gap_max, n_features)
    data = np.zeros((n, width), np.uint8)
    _write_head(data, vectors, head_ids, block)
    in_head = np.zeros((n, n_features + 1), bool)
    np.put_along_axis(in_head, head_ids, True, 1)
    common_values = np.where(in_head[:, common], 0, vectors[:, common])
    scale, signed = _write_codes(data, vectors, common_values, tail_ids, block + head_bytes, tail_bits)
    return FineRows(data, (head_bytes // HEAD_SLOT_BYTES).astype(np.uint32), scale, signed,
                    np.full(n, tail_bits, np.uint8)), whole


def fine_scores(rows: FineRows, query: np.ndarray, common: np.ndarray = NO_COMMON) -> np.ndarray:
    """Inner products of encoded rows with a query [F]: exact to float16 over the head, to the codes elsewhere. A
    compiled loop reads each row's bytes once: half the time of numpy's passes over decoded slots (500 true-size rows
    at 10%: 1.8 ms against 3.5 ms)."""
    data = np.asarray(rows.data)  # rows of a memory map as a plain array, which the compiled loop takes
    block = common_block_bytes(len(common))
    if block > data.shape[1] or np.any(common >= len(query)) or not np.isin(rows.tail_bits, CODE_BITS).all():
        raise ValueError(f"rows of {data.shape[1]} bytes with tail codes of {np.unique(rows.tail_bits)} bits, common "
                         f"features {common} and a query of {len(query)} features do not match")
    signed, tail_bits = rows.tail_signed, rows.tail_bits.astype(np.int64)
    head_slots = np.minimum(rows.head_count, (data.shape[1] - block) // HEAD_SLOT_BYTES).astype(np.int64)
    return _score_rows(data, np.ascontiguousarray(common, np.int32), np.ascontiguousarray(query, np.float32),
                       head_slots, tail_bits, _level_tables(signed, CODE_BITS[0]), _level_tables(signed, tail_bits),
                       _step(rows.tail_scale, signed, CODE_BITS[0]), _step(rows.tail_scale, signed, tail_bits),
                       FLOAT16_VALUES)


@numba.njit(nogil=True)
def _score_rows(data, common, query, head_slots, tail_bits, common_levels, tail_levels, common_step, tail_step,
                float16_values):
    """:func:`fine_scores` over plain arrays: per row, its common block, head slots and tail slots in one pass (a level
    is ``*_levels[i, code]``, a value its level times the row's step; ids past the features count as the last). A
    running id is clamped where it is read, not where it is summed, so that the chain from slot to slot is one add:
    ~20% sooner than clamping the sum (a true-size patch query's 500 rows: 1.8 against 2.3 ms)."""
    last, width = query.shape[0] - 1, data.shape[1]
    scores = np.empty(data.shape[0], np.float32)
    for i in range(data.shape[0]):
        row = data[i]
        common_sum = np.float32(0.0)  # float32 sums: float64 ones spent ~10% of the loop converting
        for j in range(common.shape[0]):
            code = (np.int64(row[j >> 1]) >> (4 * (j & 1))) & 15  # low nibble first
            common_sum += query[common[j]] * common_levels[i, code]
        head_sum, feature, byte = np.float32(0.0), 0, (common.shape[0] + 1) // 2
        for _ in range(head_slots[i]):
            feature += np.int64(row[byte])
            value = float16_values[np.int64(row[byte + 1]) | np.int64(row[byte + 2]) << 8]
            head_sum += query[min(feature, last)] * value
            byte += HEAD_SLOT_BYTES
        bits = tail_bits[i]
        tail_sum, feature = np.float32(0.0), 0
        for byte in range(byte, width):
            slot = np.int64(row[byte])
            feature += slot >> bits
            tail_sum += query[min(feature, last)] * tail_levels[i, slot & ((1 << bits) - 1)]
        scores[i] = common_sum * common_step[i] + head_sum + tail_sum * tail_step[i]
    return scores


def decode_fine_rows(rows: FineRows, n_features: int, common: np.ndarray = NO_COMMON) -> np.ndarray:
    """The dense vectors [n, F] that encoded rows stand for."""
    n = len(rows.data)
    dense = np.zeros(n * n_features)
    for features, values in _slot_entries(rows, n_features, common):
        dense += np.bincount((np.arange(n)[:, None] * n_features + features).ravel(), values.ravel(), n * n_features)
    return dense.reshape(n, n_features).astype(np.float32)


def _slot_entries(rows: FineRows, n_features: int, common: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Feature ids and values of the slots of the rows, [n, slots] each (value 0 in long-gap slots and padding), for
    the common block, the head and the tail: a code's value is its level times its row's step."""
    data, head_count, signed, tail_bits = rows.data, rows.head_count.astype(np.int64), rows.tail_signed, rows.tail_bits
    n = len(data)
    block = common_block_bytes(len(common))
    nibbles = (data[:, :block, None] >> np.array([0, 4], np.uint8) & 15).reshape(n, 2 * block)[:, :len(common)]
    data = data[:, block:]
    widest = int(head_count.max(initial=0))
    shortest = int(head_count.min(initial=widest))
    head = np.ascontiguousarray(data[:, :HEAD_SLOT_BYTES * widest])
    in_head = np.arange(widest) < head_count[:, None]
    head_features = _running_ids(np.where(in_head, head[:, ::HEAD_SLOT_BYTES], 0), n_features)
    values = (np.ndarray((n, widest), HEAD_VALUE, head, 1, (head.strides[0], HEAD_SLOT_BYTES)) if head.size
              else np.zeros((n, widest), HEAD_VALUE))  # a view of the value bytes, unaligned
    head_values = np.where(in_head, values.astype(np.float32), 0)
    tail = data[:, HEAD_SLOT_BYTES * shortest:].copy()  # bytes before it are head slots in every row
    mixed = HEAD_SLOT_BYTES * (widest - shortest)  # then head slots in some rows, which the tail must skip
    tail[:, :mixed] = np.where(np.arange(mixed) >= HEAD_SLOT_BYTES * (head_count[:, None] - shortest),
                               tail[:, :mixed], 0)
    tail_codes = tail & ((1 << tail_bits) - 1).astype(np.uint8)[:, None]
    return [(np.broadcast_to(common.astype(np.int32), (n, len(common))),
             _levels(nibbles, signed, CODE_BITS[0]) * _step(rows.tail_scale, signed, CODE_BITS[0])[:, None]),
            (head_features, head_values),
            (_running_ids(tail >> tail_bits[:, None], n_features),
             _levels(tail_codes, signed, tail_bits) * _step(rows.tail_scale, signed, tail_bits)[:, None])]


def _step(scale: np.ndarray, signed: np.ndarray, bits: np.ndarray | int) -> np.ndarray:
    """The value of one level of codes of ``bits`` bits in each row [n] (float32), from its scale and signedness."""
    return (scale / _magnitude_steps(bits, signed)).astype(np.float32)


def _magnitude_steps(bits: np.ndarray | int, signed: np.ndarray) -> np.ndarray:
    """The largest level of codes of ``bits`` bits: all of them a magnitude, or all but a sign bit."""
    return np.where(signed, (1 << (np.asarray(bits, np.int64) - 1)) - 1, (1 << np.asarray(bits, np.int64)) - 1)


def _gap_max(code_bits: int) -> int:
    """The longest gap a tail slot holds beside a code of ``code_bits`` bits."""
    return (1 << (8 - code_bits)) - 1


def _running_ids(gaps: np.ndarray, n_features: int) -> np.ndarray:
    """Feature ids [n, slots] (int32): the running sum of each row's gaps. It never decreases, so only a row whose
    last id lies past the features (a damaged file) needs clipping."""
    ids = np.cumsum(gaps, axis=1, dtype=np.int32)
    if ids.size and ids[:, -1].max() >= n_features:
        np.minimum(ids, n_features - 1, out=ids)
    return ids


def _levels(codes: np.ndarray, signed: np.ndarray, bits: np.ndarray | int) -> np.ndarray:
    """Signed step counts (float32) of codes [n, m] of ``bits`` bits (per row [n], or all) (``CODE_LEVELS``); a cast
    where no row is signed, about ten times faster than the table."""
    if not signed.any():
        return codes.astype(np.float32)
    return np.take(CODE_LEVELS.ravel(), codes | _level_table_starts(signed, bits)[:, None])


def _level_tables(signed: np.ndarray, bits: np.ndarray | int) -> np.ndarray:
    """Each row's step counts of the 16 codes of its ``bits`` bits [n, 16] (``CODE_LEVELS``)."""
    return CODE_LEVELS.ravel()[_level_table_starts(signed, bits)[:, None] + np.arange(16)]


def _level_table_starts(signed: np.ndarray, bits: np.ndarray | int) -> np.ndarray:
    """Where each row's table of 16 levels starts in the flattened ``CODE_LEVELS`` [n] (uint8)."""
    return signed.astype(np.uint8) << 4 | (np.asarray(bits) == CODE_BITS[1]).astype(np.uint8) << 5


def _whole(by_magnitude: np.ndarray, nnz: np.ndarray, width: int, n_features: int) -> np.ndarray:
    """Rows whose entries (by magnitude, as :func:`_by_magnitude` gives them) all fit in head slots of ``width``."""
    ids = _take(by_magnitude, np.zeros_like(nnz), nnz, n_features)
    return _slot_count(ids, HEAD_GAP_MAX, n_features) <= width // HEAD_SLOT_BYTES


class _Entries:
    """Each row's non-zero entries in order of magnitude (``by_magnitude``, padded with F) and, apart, those of
    features outside the common block (``rare``, same order): what the head and the tail are taken from."""

    def __init__(self, vectors: np.ndarray, common: np.ndarray):
        self.n_features = vectors.shape[1]
        self.by_magnitude, self.nnz = _by_magnitude(vectors)
        is_common = np.zeros(self.n_features + 1, bool)
        is_common[common] = True
        is_rare = (self.by_magnitude < self.n_features) & ~is_common[self.by_magnitude]
        self.n_rare = is_rare.sum(1)
        order = np.argsort(~is_rare, axis=1, kind="stable")
        self.rare = np.where(np.arange(is_rare.shape[1]) < self.n_rare[:, None],
                             np.take_along_axis(self.by_magnitude, order, 1), self.n_features)
        self._rare_before = np.concatenate([np.zeros((len(vectors), 1), np.int64), np.cumsum(is_rare, 1)], 1)

    def rows(self, at: np.ndarray) -> _Entries:
        """The entries of rows ``at`` only."""
        subset = object.__new__(_Entries)
        subset.__dict__.update({name: value[at] if isinstance(value, np.ndarray) else value
                                for name, value in vars(self).items()})
        return subset

    def rare_before(self, head: np.ndarray) -> np.ndarray:
        """How many of each row's ``head`` strongest entries are rare: where its tail starts in ``rare``."""
        return np.take_along_axis(self._rare_before, head[:, None].astype(np.int64), 1)[:, 0]

    def tail_ids(self, head: np.ndarray) -> np.ndarray:
        """Feature ids of every rare entry after the ``head`` strongest, sorted."""
        start = self.rare_before(head)
        return _take(self.rare, start, self.n_rare - start, self.n_features)


def _head_count(entries: _Entries, width: int, head_keep: int, whole: np.ndarray, tail_gap_max: int) -> np.ndarray:
    """Head entries of rows that do not fit ``whole``: the most (at least ``head_keep``) with which a tail of all the
    other rare entries still fits, searched by halving (more head entries take more bytes: 3 for a head slot, at
    most the slots of its gaps back from the tail); ``head_keep`` where even those leave too little for the whole
    tail."""
    n_features, nnz = entries.n_features, entries.nnz

    def row_bytes(head: np.ndarray) -> np.ndarray:
        head_ids = _take(entries.by_magnitude, np.zeros_like(head), head, n_features)
        return (HEAD_SLOT_BYTES * _slot_count(head_ids, HEAD_GAP_MAX, n_features)
                + _slot_count(entries.tail_ids(head), tail_gap_max, n_features))

    fits = np.minimum(nnz, head_keep)
    too_many = np.where(~whole & (row_bytes(fits) <= width), nnz, fits + 1)  # all of them in the head do not fit
    while (too_many - fits > 1).any():
        middle = (fits + too_many) // 2
        ok = row_bytes(middle) <= width
        fits, too_many = np.where(ok, middle, fits), np.where(ok, too_many, middle)
    return fits


def _write_head(data: np.ndarray, vectors: np.ndarray, ids: np.ndarray, offset: int) -> None:
    """Head slots (gap, float16 value) of the entries ``ids`` from byte ``offset`` of each row."""
    gaps, at, features = _place(ids, HEAD_GAP_MAX, vectors.shape[1])
    values = np.zeros(gaps.shape, HEAD_VALUE)
    values[at] = vectors[at[0], features]
    slots = np.concatenate([gaps[..., None], values.view(np.uint8).reshape(*gaps.shape, 2)], axis=2)
    data[:, offset:offset + slots.shape[1] * HEAD_SLOT_BYTES] = slots.reshape(len(data), -1)


def _write_codes(data: np.ndarray, vectors: np.ndarray, common_values: np.ndarray, tail_ids: np.ndarray,
                 tail_offset: np.ndarray, tail_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The codes: 4-bit ones of the common block's values [n, D] at the start of each row, and tail slots (gap, code
    of ``tail_bits``) of the entries ``tail_ids`` from byte ``tail_offset``; their scale and signedness per row."""
    gaps, at, features = _place(tail_ids, _gap_max(tail_bits), vectors.shape[1])
    values = np.zeros(gaps.shape, np.float32)
    values[at] = vectors[at[0], features]
    scale = np.maximum(np.abs(values).max(1, initial=0), np.abs(common_values).max(1, initial=0)).astype(np.float32)
    signed = (values < 0).any(1) | (common_values < 0).any(1)
    common_codes = _codes(common_values, scale, signed, CODE_BITS[0])
    if common_codes.shape[1] % 2:
        common_codes = np.pad(common_codes, ((0, 0), (0, 1)))
    data[:, :common_codes.shape[1] // 2] = common_codes[:, 0::2] | common_codes[:, 1::2] << 4
    packed = (gaps << tail_bits) | _codes(values, scale, signed, tail_bits)
    columns = tail_offset[:, None] + np.arange(packed.shape[1])
    inside = columns < data.shape[1]  # what lies beyond is padding
    data[np.nonzero(inside)[0], columns[inside]] = packed[inside]
    return scale, signed


def _codes(values: np.ndarray, scale: np.ndarray, signed: np.ndarray, bits: int) -> np.ndarray:
    """Codes of ``bits`` bits of values [n, m] in even steps up to their row's scale (0 for zeros and empty slots)."""
    relative = np.abs(values) / np.where(scale > 0, scale, 1)[:, None]
    codes = np.rint(relative * _magnitude_steps(bits, signed)[:, None]).astype(np.uint8)
    sign = np.uint8(1 << (bits - 1))
    return np.where(signed[:, None] & (values < 0) & (codes > 0), codes | sign, codes).astype(np.uint8)


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
    def slots_over(counts: np.ndarray) -> np.ndarray:
        return _slot_count(_take(by_magnitude, start, counts, n_features), gap_max, n_features) - slots

    def fitting(counts: np.ndarray) -> np.ndarray:
        return slots_over(counts) <= 0

    fits = np.minimum(count, np.maximum(0, (by_magnitude < n_features).sum(1) - start))
    too_many = fits + 1
    while True:
        over = slots_over(fits)
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
