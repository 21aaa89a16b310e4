"""The indices of torch's top-k on a CPU, found by the same steps, sooner.

Where k x 64 <= n, ``torch.topk`` on a CPU selects with libstdc++'s ``std::partial_sort``: a heap of the first k
entries, each later entry larger than the heap's smallest replacing it, then the heap sorted, largest first. Which
entries it keeps among those that tie with the k-th value depends on that heap's history, and a CLT's bfloat16
pre-activations tie there in most rows (at ViT-B/32 size, 64-100% of the rows of a layer, 5-6 entries sharing the
k-th value): a selection by threshold or partition keeps other features. This module replays the same heap steps in
compiled code, each entry's value and index packed in one 64-bit word (the value as an unsigned integer of the same
order in the upper half, so that a comparison reads the upper halves and a move is one word), the hole sinking through
the smaller child without a branch, the rows split between numba's threads: 1.6-1.9 against torch's 2.8-3.2 ms for 100
x 12,288 bfloat16 on 2 cores, the same indices in the same order, and an analysis's model pass 12-19 ms shorter
(``scripts/bench_topk.py``). A Python thread pool instead of numba's threads lost that to waiting beside torch's.
Everything else (a GPU, other dtypes, k x 64 > n, a NaN among the scores, a torch built with another C++
library than Linux's libstdc++) keeps ``torch.topk``.
"""

from __future__ import annotations

import sys
import threading

import numba
import numpy as np
import torch

# the dtypes replayed, with the unsigned view of their bits and the shift that makes those bits a float32's
BITS_VIEWS = {torch.bfloat16: (torch.uint16, 16), torch.float32: (torch.uint32, 0)}
# torch's Linux builds sort with libstdc++, whose heap steps these are (libc++'s and MSVC's differ, and so would their
# choice among ties)
LIBSTDCXX = sys.platform.startswith("linux")
ROWS_PER_THREAD = 16  # fewer rows than this per thread are not worth a thread's start
# one launch of the compiled threads at a time: numba's fallback threading layer (workqueue, where neither TBB nor
# OpenMP is found) aborts the process on launches from two threads at once, which a web server's requests would make
_LAUNCH = threading.Lock()


def replays(scores: torch.Tensor, k: int) -> bool:
    """Whether :func:`top_indices` replays torch's heap for these scores, rather than calling ``torch.topk``."""
    n = scores.shape[-1] if scores.dim() else 0
    return (LIBSTDCXX and scores.device.type == "cpu" and scores.dtype in BITS_VIEWS and 1 <= k and k * 64 <= n < 2**32
            and scores.numel() > 0)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``scores.topk(k, dim=-1, sorted=False).indices``, the same indices in the same order (no gradient flows
    through indices)."""
    if not replays(scores, k):
        return scores.topk(k, dim=-1, sorted=False).indices
    n = scores.shape[-1]
    view, shift = BITS_VIEWS[scores.dtype]
    bits = scores.detach().reshape(-1, n).contiguous().view(view).numpy()
    out = np.empty((bits.shape[0], k), np.int64)
    parts = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, bits.shape[0] // ROWS_PER_THREAD))
    with _LAUNCH:
        found_nan = _select_rows(bits, shift, k, out, parts)
    if found_nan:  # torch ranks NaN above everything: its own top-k decides
        return scores.topk(k, dim=-1, sorted=False).indices
    return torch.from_numpy(out).view(*scores.shape[:-1], k)


@numba.njit(nogil=True, parallel=True)
def _select_rows(bits, shift, k, out, parts):
    """:func:`_heap_select` over all rows, split into ``parts`` runs of rows on numba's threads; whether a NaN was
    seen."""
    n_rows = bits.shape[0]
    found_nan = np.zeros(parts, np.bool_)
    for part in numba.prange(parts):
        found_nan[part] = _heap_select(bits, shift, k, out, n_rows * part // parts, n_rows * (part + 1) // parts)
    return found_nan.any()


@numba.njit(inline="always")
def _sift(heap, hole, length, item):
    """libstdc++'s ``__adjust_heap`` for a heap whose root is its smallest value: the hole at ``hole`` sinks to a
    leaf through the smaller child (the right one where they tie), then ``item`` rises from there while its parent is
    larger."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * child + 2
        child -= np.int64((heap[child] >> np.uint64(32)) > (heap[child - 1] >> np.uint64(32)))
        heap[hole] = heap[child]
        hole = child
    if (length & 1) == 0 and child == (length - 2) // 2:
        child = 2 * child + 2
        heap[hole] = heap[child - 1]
        hole = child - 1
    key = item >> np.uint64(32)
    parent = (hole - 1) // 2
    while hole > top and (heap[parent] >> np.uint64(32)) > key:
        heap[hole] = heap[parent]
        hole = parent
        parent = (hole - 1) // 2
    heap[hole] = item


@numba.njit(nogil=True)
def _heap_select(bits, shift, k, out, first_row, end_row):
    """Rows ``first_row..end_row`` of ``std::partial_sort(first, first + k, last, greater)`` over the floats whose
    bits (shifted left by ``shift``) are ``bits`` [rows, n], their indices into ``out`` [rows, k]; whether a NaN was
    seen (those rows are then left unfinished)."""
    n = bits.shape[1]
    keys = np.empty(n, np.uint32)
    heap = np.empty(k, np.uint64)
    nan = False
    for row in range(first_row, end_row):
        for j in range(n):  # branch-free, so that it compiles to vector instructions
            b = np.uint32(bits[row, j]) << np.uint32(shift)
            nan |= (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            b = np.uint32(0) if b == np.uint32(0x80000000) else b  # -0 ties with +0
            keys[j] = b ^ (np.uint32(0xFFFFFFFF) if b >> np.uint32(31) else np.uint32(0x80000000))  # float order
        if nan:
            return True
        for j in range(k):
            heap[j] = (np.uint64(keys[j]) << np.uint64(32)) | np.uint64(j)
        parent = (k - 2) // 2
        while k > 1:  # __make_heap
            _sift(heap, parent, k, heap[parent])
            if parent == 0:
                break
            parent -= 1
        smallest = np.uint32(heap[0] >> np.uint64(32))
        for i in range(k, n):  # __heap_select
            if keys[i] > smallest:
                _sift(heap, 0, k, (np.uint64(keys[i]) << np.uint64(32)) | np.uint64(i))
                smallest = np.uint32(heap[0] >> np.uint64(32))
        last = k
        while last > 1:  # __sort_heap
            last -= 1
            item = heap[last]
            heap[last] = heap[0]
            _sift(heap, 0, last, item)
        for j in range(k):
            out[row, j] = np.int64(heap[j] & np.uint64(0xFFFFFFFF))
    return False
