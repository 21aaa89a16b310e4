"""A compact thumbnail store for the indexed training images, read by the app's galleries.

    thumbnails/images.bin          JPEG bytes of every thumbnail, one after the other
    thumbnails/index.safetensors   offsets [N + 1], labels [N], dataset indices [N] (int64)
    thumbnails/meta.json           count, size, dataset split

Thumbnail id ``i`` is row ``i`` of every retrieval index. Reading one is a slice of a memory map
and one small JPEG decode; the whole store is a few KB per image.
"""

from __future__ import annotations

import io
import mmap
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..progress import tqdm
from ..storage import AssetError, atomic_path, check_keys, load_tensors, read_json, save_tensors, write_json

IMAGES, INDEX, META = "images.bin", "index.safetensors", "meta.json"


def build_thumbnails(dataset: Dataset, indices: Sequence[int], folder: str | Path, size: int = 96,
                     quality: int = 85, split: str = "train", progress: bool = True) -> "ThumbnailStore":
    """Write thumbnails (longest side ``size``) of ``dataset[indices]`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    offsets, labels = [0], []
    with atomic_path(folder / IMAGES) as tmp, open(tmp, "wb") as out:
        for index in tqdm(indices, desc="thumbnails", disable=not progress):
            image, label = dataset[index]
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            out.write(buffer.getvalue())
            offsets.append(offsets[-1] + buffer.tell())
            labels.append(int(label))
    save_tensors(folder / INDEX, {"offsets": torch.tensor(offsets, dtype=torch.long),
                                  "labels": torch.tensor(labels, dtype=torch.long),
                                  "dataset_indices": torch.tensor(list(indices), dtype=torch.long)})
    write_json(folder / META, {"count": len(labels), "size": size, "split": split})
    return ThumbnailStore(folder)


class ThumbnailStore:
    """Random access to thumbnails by id."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        meta = read_json(folder / META)
        check_keys(meta, {"count", "size"}, {"split"}, str(folder / META))
        tensors = load_tensors(folder / INDEX)
        if set(tensors) != {"offsets", "labels", "dataset_indices"}:
            raise AssetError(f"{folder / INDEX}: expected offsets, labels and dataset_indices, got {sorted(tensors)}")
        self.offsets = tensors["offsets"].tolist()
        self.labels = tensors["labels"].tolist()
        self.dataset_indices = tensors["dataset_indices"].tolist()
        self.size = meta["size"]
        count = meta["count"]
        if not (len(self.offsets) == count + 1 and len(self.labels) == len(self.dataset_indices) == count):
            raise AssetError(f"{folder / INDEX}: holds {len(self.labels)} thumbnails, {META} says {count}")
        path = folder / IMAGES
        if not path.is_file() or path.stat().st_size != self.offsets[-1]:
            raise AssetError(f"{path}: missing or truncated (expected {self.offsets[-1]} bytes)")
        with open(path, "rb") as f:
            self._bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.offsets[-1] else b""

    def __len__(self) -> int:
        return len(self.labels)

    def jpeg(self, thumbnail_id: int) -> bytes:
        """The JPEG file of one thumbnail."""
        if not 0 <= thumbnail_id < len(self):
            raise IndexError(f"thumbnail id {thumbnail_id} out of range [0, {len(self)})")
        return self._bytes[self.offsets[thumbnail_id]:self.offsets[thumbnail_id + 1]]

    def image(self, thumbnail_id: int) -> Image.Image:
        image = Image.open(io.BytesIO(self.jpeg(thumbnail_id)))
        image.load()
        return image
