"""Keeps the pages of memory-mapped indexes that this process holds within a budget.

A search reads a compact index through memory maps, and every page it touches stays mapped, counted in the process's
resident memory, until it is unmapped. Unmapped pages stay in the OS page cache: unmapping frees none of the
machine's memory, only lowers the process's count. Unmapping after every search held that count to one search's
pages, but cost more than the search: a true-size search at 10% maps ~40 MB (most of the coarse tier, whose
high-mass columns every query reads, and the per-image numbers), and unmapping then mapping them again took 4.7 ms
of 8.7 (before the fine rows were read unmapped, :mod:`.row_file`). So the pages of every open index are unmapped
together, once the process's resident file pages have grown by ``BUDGET`` since the last time. With 24 loaded copies
of a true-size index at 10% searched in turn, as an analysis of a 12-layer CLT searches every layer's index, a budget
of 256 MB took 6.9 ms a search, 1 GB 4.7 ms: with 1 GB every layer's pages of one CLT stay mapped, and the process's
peak grows by ~0.7 GB of page cache. The budget is 256 MB, so that the app's peak at ViT-B/32 size stays within
3.5 GB: there, with the text tower freed, its peak (VmHWM, `bench_app.py`) is 3.38-3.39 GB, against 3.76-3.83 GB with
1 GB (384 MB: 3.47-3.48, 512 MB: 3.61-3.64), and the 24 searches of one analysis take ~88 ms, against ~64 ms with
pages never unmapped (medians of four rounds of ten analyses in one process). Unmapping only the index just searched
once over the budget (those searched first stay mapped) took as long (87 ms). Since the coarse tier stores 16-bit row
ids (:mod:`.compact`), they take 69-71 ms.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from typing import Protocol

BUDGET = 256 << 20  # bytes

_STATM = "/proc/self/statm"  # Linux: its third field counts resident file-backed pages


class Releasable(Protocol):
    def release_pages(self) -> None:
        """Unmap the pages of the index's files."""


_indexes: weakref.WeakSet[Releasable] = weakref.WeakSet()
_lock = threading.Lock()
_resident_after_release: int | None = None


def register(index: Releasable) -> None:
    """Count an open index's pages in the budget."""
    _indexes.add(index)


def searched() -> None:
    """Call after a search: unmaps every open index's pages if the process's resident file pages have grown by
    ``BUDGET`` since the last release (after every search where the system does not tell them)."""
    global _resident_after_release
    with _lock:
        resident = resident_file_bytes()
        if None not in (resident, _resident_after_release) and resident - _resident_after_release < BUDGET:
            return
        for index in list(_indexes):
            index.release_pages()
        _resident_after_release = resident_file_bytes()


def resident_file_bytes() -> int | None:
    """Bytes of this process's resident file-backed pages, or None where the system does not tell."""
    try:
        with open(_STATM) as statm:
            return int(statm.read().split()[2]) * mmap.PAGESIZE
    except (OSError, IndexError, ValueError):
        return None
