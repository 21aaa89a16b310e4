"""Dataset adapters. Every dataset yields ``(PIL image, int label)`` and carries ``classnames``,
``templates`` (zero-shot prompts) and ``labels`` (all labels, without decoding any image)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm


class _Preprocessed(Dataset):
    """Applies the teacher's preprocessing to a dataset's images; yields (pixels, label, index)."""

    def __init__(self, dataset: Dataset, transform: Callable, indices: Sequence[int]):
        self.dataset, self.transform, self.indices = dataset, transform, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        image, label = self.dataset[index]
        return self.transform(image.convert("RGB")), label, index


def image_batches(dataset: Dataset, transform: Callable, batch_size: int, indices: Sequence[int] | None = None,
                  num_workers: int = 0) -> DataLoader:
    """Batches ``(pixels [B, 3, H, W], labels [B], dataset indices [B])`` in the order of ``indices``."""
    indices = range(len(dataset)) if indices is None else indices
    return DataLoader(_Preprocessed(dataset, transform, indices), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, persistent_workers=False)


def preprocess_all(dataset: Dataset, transform: Callable, desc: str = "preprocessing", progress: bool = True,
                   batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (small) dataset as one pixel tensor and one label tensor."""
    pixels, labels = [], []
    for batch, label, _ in tqdm(image_batches(dataset, transform, batch_size), desc=desc, disable=not progress):
        pixels.append(batch)
        labels.append(label)
    return torch.cat(pixels), torch.cat(labels)


__all__ = ["Subset", "image_batches", "preprocess_all"]
