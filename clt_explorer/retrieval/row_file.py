"""Reads chosen rows of a 2-D .npy array from its file, one positioned read (pread) each, in a compiled loop.

A search reads 500 rows scattered over a compact index's fine tier. Through a memory map, each row's page fault
mapped the whole page-cache folio around it (~100 kB for a 4 kB row: 50 MB per true-size search at 10%), which then
had to be unmapped (:mod:`.mapped_pages`): faults and unmapping took ~2.5 ms a search. Positioned reads copy the
500 rows from the page cache and map nothing. The loop calls the C library's ``pread`` from compiled code without
the GIL: from Python (``os.preadv`` per row) it took 0.7 ms a search and, taking the GIL back 500 times, kept two
searches from running side by side.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from pathlib import Path

import numba
import numpy as np

from ..storage import AssetError

# POSIX with a 64-bit file offset (not on Windows, where searches read the memory map instead)
AVAILABLE = os.name == "posix" and ctypes.sizeof(ctypes.c_void_p) == 8
if AVAILABLE:
    _pread = ctypes.CDLL(None).pread
    _pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
    _pread.restype = ctypes.c_ssize_t

    @numba.njit(nogil=True)
    def _read_rows(fd, out, offset, row_bytes, rows):
        """Read rows ``rows`` of ``row_bytes`` bytes at file offset ``offset`` into the rows of ``out``; the bytes
        read (fewer where the file is short)."""
        total, base = 0, out.ctypes.data
        for i in range(rows.shape[0]):
            read = _pread(fd, base + i * row_bytes, row_bytes, offset + rows[i] * row_bytes)
            if read != row_bytes:
                return total + max(read, 0)
            total += read
        return total


class RowFile:
    """The rows of ``array``, a memory map of the .npy file ``path``, read from the file."""

    def __init__(self, path: Path, array: np.memmap):
        self.path, self.offset, self.shape, self.dtype = path, array.offset, array.shape, array.dtype
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)

    def rows(self, at: np.ndarray) -> np.ndarray:
        """Rows ``at`` [len(at), width] (each in range)."""
        out = np.empty((len(at), *self.shape[1:]), self.dtype)
        row_bytes = out[0].nbytes if len(at) else 0
        if _read_rows(self.fd, out, self.offset, row_bytes, np.asarray(at, np.int64)) != out.nbytes:
            raise AssetError(f"{self.path}: shorter than its {self.shape} rows")
        return out
