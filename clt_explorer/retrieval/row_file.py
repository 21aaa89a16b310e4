"""Reads chosen rows of a 2-D .npy array from its file, one positioned read (pread) each.

A search reads 500 rows scattered over a compact index's fine tier. Through a memory map, each row's page fault
mapped the whole page-cache folio around it (~100 kB for a 4 kB row: 50 MB per true-size search at 10%), which then
had to be unmapped (:mod:`.mapped_pages`): faults and unmapping took ~2.5 ms a search. Positioned reads copy the
500 rows from the page cache in ~0.7 ms and map nothing.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np

from ..storage import AssetError

AVAILABLE = hasattr(os, "preadv")  # not on Windows, where searches read the memory map instead


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
        read = sum(os.preadv(self.fd, [out[i]], self.offset + row * row_bytes) for i, row in enumerate(at.tolist()))
        if read != out.nbytes:
            raise AssetError(f"{self.path}: shorter than its {self.shape} rows")
        return out
