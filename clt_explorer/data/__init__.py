"""Dataset adapters. Every dataset yields ``(PIL image, int label)`` and carries ``classnames``,
``templates`` (zero-shot prompts) and ``labels`` (all labels, without decoding any image)."""

from __future__ import annotations

import os
import shutil
import warnings
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


SHARED_MEMORY = "/dev/shm"  # where a DataLoader's workers put the batches they hand over
PREFETCHED_BATCHES = 2  # batches each worker keeps ready (DataLoader's default prefetch_factor)


def image_batches(dataset: Dataset, transform: Callable, batch_size: int, indices: Sequence[int] | None = None,
                  num_workers: int = 0, device: torch.device | str | None = None) -> DataLoader:
    """Batches ``(pixels [B, 3, H, W], labels [B], dataset indices [B])`` in the order of ``indices``, for ``device``
    (see :func:`grouped_image_batches`)."""
    return grouped_image_batches(dataset, transform, batch_size, [range(len(dataset)) if indices is None else indices],
                                 num_workers, device)


def grouped_image_batches(dataset: Dataset, transform: Callable, batch_size: int, groups: Sequence[Sequence[int]],
                          num_workers: int = 0, device: torch.device | str | None = None) -> DataLoader:
    """:func:`image_batches` of each group of dataset indices in turn, a batch never holding two groups' images, from
    one loader: its workers keep preparing images across the groups' boundaries (a loader per group would start
    its workers again and drain its queue at each).

    Batches for a CUDA ``device`` come in page-locked (pinned) memory: copying one there with ``non_blocking``
    (:meth:`Teacher.on_device`) then neither waits for the work queued on the device nor holds up this process,
    where a copy from ordinary memory first waits for the device to finish everything queued."""
    flat, batches = [], []
    for group in groups:
        start = len(flat)
        flat += list(group)
        batches += [range(first, min(first + batch_size, len(flat))) for first in range(start, len(flat), batch_size)]
    pinned = device is not None and torch.device(device).type == "cuda"
    return DataLoader(_Preprocessed(dataset, transform, flat), batch_sampler=batches, num_workers=num_workers,
                      prefetch_factor=PREFETCHED_BATCHES if num_workers else None, persistent_workers=False,
                      pin_memory=pinned)


def loader_workers(device: torch.device | str, batch_bytes: int, requested: int | None = None) -> int:
    """Image-loading worker processes for passes over a dataset on ``device``: ``requested`` where it is given (a
    user's count), else the default. On a GPU that is this process's share of the CPU cores (under torchrun, the
    node's cores are split between its ranks) but one, which feeds the GPU; on a CPU none, since the cores compute
    the teacher and the CLT. (One process prepared 610-700 small PNG images a second for ViT-B/32 on 2 cores, and
    training one CLT at 130k tokens/s reads 2,600: scripts/bench_loading.py.)

    Each worker hands over its batches of ``batch_bytes`` through shared memory (``/dev/shm``) and keeps up to
    ``PREFETCHED_BATCHES`` ready: the workers get at most half of its free space, since a worker that finds it full
    dies of a bus error. A container's default 64 MB holds none, and the loading stays in the main process, with a
    warning saying how to give it more."""
    if requested is not None:
        return requested
    if torch.device(device).type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(0, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)
    if os.path.isdir(SHARED_MEMORY):
        free = shutil.disk_usage(SHARED_MEMORY).free
        fitting = free // 2 // (PREFETCHED_BATCHES * batch_bytes)
        if fitting < workers:
            warnings.warn(f"{SHARED_MEMORY} has {free / 1e6:.0f} MB free, room for {fitting} image-loading workers of "
                          f"the {workers} this machine's cores could run ({batch_bytes / 1e6:.0f} MB a batch): a "
                          "container gets more with `docker run --shm-size 8g`", stacklevel=2)
            workers = fitting
    return workers


def preprocess_all(dataset: Dataset, transform: Callable, desc: str = "preprocessing", progress: bool = True,
                   batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (small) dataset as one pixel tensor and one label tensor."""
    pixels, labels = [], []
    for batch, label, _ in tqdm(image_batches(dataset, transform, batch_size), desc=desc, disable=not progress):
        pixels.append(batch)
        labels.append(label)
    return torch.cat(pixels), torch.cat(labels)


__all__ = ["DATASETS", "DatasetMissing", "Subset", "grouped_image_batches", "image_batches", "load_dataset",
           "loader_workers", "preprocess_all", "split_name"]
