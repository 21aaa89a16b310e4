"""Dataset adapters. Every dataset yields ``(PIL image, int label)`` and carries ``classnames``,
``templates`` (zero-shot prompts) and ``labels`` (all labels, without decoding any image)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..progress import tqdm
from .cifar100 import CIFAR100
from .coco import coco
from .errors import DatasetMissing
from .folder import image_folder
from .imagenet100 import imagenet100
from .synthetic import SyntheticShapes


@dataclass(frozen=True)
class DatasetKind:
    """How to open one kind of dataset: a factory(split, **options) and its default split names."""

    open: Callable[..., Dataset]
    train_split: str
    test_split: str


def _synthetic(split: str, n_train: int = 20000, n_test: int = 2000, image_size: int = 64, seed: int = 0):
    return SyntheticShapes(split, n_train if split == "train" else n_test, image_size, seed)


def _coco(split: str, root: str):
    return coco(Path(root) / split, Path(root) / "annotations" / f"instances_{split}.json")


DATASETS: dict[str, DatasetKind] = {
    "synthetic": DatasetKind(_synthetic, "train", "test"),
    "cifar100": DatasetKind(lambda split, root, download=True: CIFAR100(root, split, download), "train", "test"),
    "imagenet100": DatasetKind(lambda split, root: imagenet100(root, split), "train", "val"),
    "coco": DatasetKind(_coco, "train2017", "val2017"),
    "folder": DatasetKind(lambda split, root, templates=None: image_folder(root, split, templates), "train", "test"),
}


def split_name(name: str, which: str) -> str:
    """The split a dataset kind calls ``train`` or ``test`` (e.g. ImageNet's held-out split is ``val``)."""
    kind = DATASETS[name]
    return kind.train_split if which == "train" else kind.test_split


def load_dataset(name: str, split: str, **options) -> Dataset:
    """Open split ``split`` of dataset kind ``name`` (see :data:`DATASETS`) with its options."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    try:
        return DATASETS[name].open(split, **options)
    except TypeError as error:
        raise ValueError(f"bad options {options} for dataset {name!r}: {error}") from error


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


__all__ = ["DATASETS", "DatasetMissing", "Subset", "image_batches", "load_dataset", "preprocess_all", "split_name"]
