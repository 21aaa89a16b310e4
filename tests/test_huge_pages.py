"""Large weights cast on load are advised to Linux as huge-page memory, and stay the same numbers."""

import sys
from pathlib import Path

import pytest
import torch

from clt_explorer import CLTConfig, CrossLayerTranscoder
from clt_explorer.model import huge_pages
from clt_explorer.model.huge_pages import HUGE_PAGE_BYTES, whole_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ON_LINUX_WITH_THP = sys.platform.startswith("linux") and THP.exists()


def advised_huge(start: int, end: int) -> bool:
    """Whether the memory mapping holding [start, end) carries the MADV_HUGEPAGE flag ("hg" in /proc/self/smaps)."""
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
            mapping = low <= start and end <= high
        elif mapping and head == "VmFlags:":
            return "hg" in line.split()[1:]
    return False


def test_the_advised_range_is_the_whole_huge_pages_inside_the_tensor():
    for megabytes in (5, 9):
        tensor = torch.empty(megabytes << 20, dtype=torch.uint8)
        start, end = whole_huge_pages(tensor)
        assert start % HUGE_PAGE_BYTES == 0 and end % HUGE_PAGE_BYTES == 0
        assert tensor.data_ptr() <= start < end <= tensor.data_ptr() + tensor.numel()
        assert end - start >= (megabytes - 2) // 2 * HUGE_PAGE_BYTES  # all but the partial pages at both ends
    start, end = whole_huge_pages(torch.empty(100_000, dtype=torch.uint8))
    assert start == end


@pytest.mark.skipif(not ON_LINUX_WITH_THP, reason="needs Linux with transparent huge pages")
def test_a_huge_page_tensor_is_advised_before_it_is_written():
    tensor = huge_pages.empty((3 << 20,), torch.float32)  # 12 MB
    assert advised_huge(*whole_huge_pages(tensor))
    assert not advised_huge(*whole_huge_pages(torch.empty(3 << 20, dtype=torch.float32)))


def test_weights_cast_on_load_equal_the_saved_ones_cast(tmp_path):
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(3, 256, 32, "jumprelu", 8))  # W_enc: 3 x 256 x 8192 fp32, 25 MB
    clt.save_pretrained(tmp_path)
    loaded = CrossLayerTranscoder.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for (name, saved), (loaded_name, mine) in zip(clt.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == loaded_name
        expected = saved if CrossLayerTranscoder.keeps_fp32(name) else saved.to(torch.bfloat16)
        assert mine.dtype == expected.dtype and torch.equal(mine, expected), name
    if ON_LINUX_WITH_THP:
        assert advised_huge(*whole_huge_pages(loaded.W_enc))
