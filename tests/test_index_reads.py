import mmap
from pathlib import Path

import numpy as np
import pytest
from test_retrieval import compact, random_descriptors

from clt_explorer.retrieval import compact as compact_module
from clt_explorer.retrieval import mapped_pages, row_file
from clt_explorer.retrieval.compact import CompactIndex, column_sums
from clt_explorer.storage import AssetError


class Spy:
    def __init__(self):
        self.releases = 0

    def release_pages(self):
        self.releases += 1


def test_open_indexes_are_released_together_once_resident_file_pages_grow_by_the_budget(monkeypatch):
    budget = mapped_pages.BUDGET  # each search reads the resident bytes, and a release reads them again after
    resident = iter([1000, 1000, 1000 + budget - 1, 1000 + budget, 50, 60, None, 70, None, None, 80, 80])
    monkeypatch.setattr(mapped_pages, "resident_file_bytes", lambda: next(resident))
    monkeypatch.setattr(mapped_pages, "_resident_after_release", None)
    monkeypatch.setattr(mapped_pages, "_indexes", type(mapped_pages._indexes)())
    first, second = Spy(), Spy()
    mapped_pages.register(first)
    mapped_pages.register(second)
    mapped_pages.searched()  # nothing known before: releases
    assert (first.releases, second.releases) == (1, 1)
    mapped_pages.searched()  # grown by BUDGET - 1
    assert first.releases == 1
    mapped_pages.searched()  # grown by BUDGET: releases
    assert (first.releases, second.releases) == (2, 2)
    mapped_pages.searched()  # 60 against 50 after the release
    assert first.releases == 2
    mapped_pages.searched()  # the system does not tell: releases at every search
    mapped_pages.searched()
    assert first.releases == 4
    del second
    mapped_pages.searched()  # a closed index is no longer held
    assert first.releases == 5 and len(mapped_pages._indexes) == 1


def mapped_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            current = fields[5] if len(fields) > 5 else None
        elif fields[0] == "Rss:" and current == str(path):
            total += int(fields[1])
    return total


@pytest.mark.skipif(mapped_pages.resident_file_bytes() is None, reason="no /proc/self/statm")
def test_a_loaded_index_keeps_its_searched_pages_mapped_within_the_budget_and_reads_fine_rows_unmapped(tmp_path,
                                                                                                      monkeypatch):
    database = random_descriptors(3000, f=400, nnz=200)
    compact(database, 600, coarse_keep=16, candidates=1000).save(tmp_path / "i")
    index = CompactIndex.load(tmp_path / "i")
    coarse, fine = tmp_path / "i" / "coarse_indices.npy", tmp_path / "i" / "fine_rows.npy"
    monkeypatch.setattr(mapped_pages, "BUDGET", 1 << 40)
    index.search(database[:3], 5)  # the first search since the process started may release
    index.search(database[3:6], 5)
    assert mapped_kb(coarse) > 50  # 3,000 rows x 16 entries x 2 bytes, most read
    assert mapped_kb(fine) == 0 and row_file.AVAILABLE  # 1,000 rows of 600 bytes read from the file
    monkeypatch.setattr(mapped_pages, "BUDGET", 0)
    found = index.search(database[:3], 5)[1]
    assert mapped_kb(coarse) == 0
    assert found[:, 0].tolist() == [0, 1, 2]  # read again from the page cache



def test_small_corpora_store_short_row_ids_and_search_as_with_long_ones(tmp_path, monkeypatch):
    """Up to 65,536 images the coarse tier's row ids take 16 bits (3 bytes an entry mapped and read instead of 5);
    an index with 32-bit ones (larger corpora, and every index built before) loads and finds the same."""
    database = random_descriptors(400, f=300, nnz=80)
    short = compact(database, 400, coarse_keep=12, candidates=60)
    monkeypatch.setattr(compact_module, "SHORT_ROW_IDS_UP_TO", 399)  # this corpus counts as a large one
    long = compact(database, 400, coarse_keep=12, candidates=60)
    assert short.arrays["coarse_indices"].dtype == np.uint16 and long.arrays["coarse_indices"].dtype == np.int32
    assert np.array_equal(short.arrays["coarse_indices"], long.arrays["coarse_indices"])
    monkeypatch.undo()
    for index, name in ((short, "short"), (long, "long")):
        index.save(tmp_path / name)
    loaded = {name: CompactIndex.load(tmp_path / name) for name in ("short", "long")}
    assert loaded["short"].arrays["coarse_indices"].dtype == np.uint16
    found = [index.search(database[:20], 5) for index in (short, *loaded.values())]
    assert np.array_equal(found[0][1], found[1][1]) and np.array_equal(found[0][1], found[2][1])
    assert found[0][1][:, 0].tolist() == list(range(20))


def test_a_damaged_coarse_tier_is_refused_on_load_and_stray_row_ids_are_never_written(tmp_path):
    database = random_descriptors(100, f=64, nnz=20)
    compact(database, 100, coarse_keep=4, candidates=30).save(tmp_path / "i")
    indptr = np.load(tmp_path / "i" / "coarse_indptr.npy")
    np.save(tmp_path / "i" / "coarse_indptr.npy", indptr[::-1].copy())
    with pytest.raises(AssetError, match="column pointers"):
        CompactIndex.load(tmp_path / "i")
    indices = np.array([0, 5, 70_000, 99], np.int32)  # one row id past the 100 rows
    sums = column_sums(np.array([0, 4]), indices, np.ones(4, np.int8), np.array([0]), np.array([2.0], np.float32), 100)
    assert sums[[0, 5, 99]].tolist() == [2.0, 2.0, 2.0] and sums.sum() == 6.0

@pytest.mark.skipif(not row_file.AVAILABLE, reason="no positioned reads")
def test_a_row_file_reads_the_rows_its_memory_map_holds_and_refuses_a_short_file(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(50, 37), dtype=np.uint8)
    np.save(tmp_path / "a.npy", array)
    rows = row_file.RowFile(tmp_path / "a.npy", np.load(tmp_path / "a.npy", mmap_mode="r"))
    at = np.array([49, 0, 7, 7])
    assert np.array_equal(rows.rows(at), array[at]) and rows.rows(at[:0]).shape == (0, 37)
    with open(tmp_path / "a.npy", "r+b") as file:
        file.truncate(file.seek(0, 2) - 10)
    with pytest.raises(AssetError, match="a.npy: shorter than its \\(50, 37\\) rows"):
        rows.rows(at)


def test_where_pages_cannot_be_unmapped_or_rows_read_by_position_a_loaded_index_searches_its_memory_maps(
        tmp_path, monkeypatch):
    database = random_descriptors(500, f=300, nnz=100)
    built = compact(database, 300, coarse_keep=16, candidates=100)
    built.save(tmp_path / "i")
    monkeypatch.delattr(mmap, "MADV_DONTNEED")  # as on Windows, whose mmap has no madvise
    monkeypatch.setattr(row_file, "AVAILABLE", False)  # nor pread
    monkeypatch.setattr(mapped_pages, "resident_file_bytes", lambda: None)  # nor /proc: release after every search
    index = CompactIndex.load(tmp_path / "i")
    assert index.fine_file is None
    found, expected = index.search(database[:20], 5), built.search(database[:20], 5)
    assert np.array_equal(found[1], expected[1]) and np.allclose(found[0], expected[0])
