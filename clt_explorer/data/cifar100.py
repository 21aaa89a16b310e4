"""CIFAR-100 through torchvision: downloaded into ``root`` when online, else read from there.

torchvision checks every file's MD5 against the published archive before it reads the (pickled)
batches, so nothing but the official files is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from .errors import DatasetMissing
from .resources import cifar100_classnames, cifar_templates


class CIFAR100(Dataset):
    """CIFAR-100 fine labels; ``split`` is ``train`` (50k) or ``test`` (10k)."""

    def __init__(self, root: str | Path, split: str = "test", download: bool = True):
        from torchvision.datasets import CIFAR100 as TorchvisionCIFAR100

        if split not in ("train", "test"):
            raise ValueError(f"CIFAR-100 splits are 'train' and 'test', got {split!r}")
        folder = Path(root) / TorchvisionCIFAR100.base_folder
        try:
            self.data = TorchvisionCIFAR100(str(root), train=split == "train", download=download)
        except Exception as error:  # offline download failures, missing and altered files all end here
            if folder.is_dir() and any(folder.iterdir()):
                raise DatasetMissing(
                    f"the CIFAR-100 files under {folder} do not pass torchvision's MD5 check ({error}): only the "
                    f"official archive's files are read (they are pickles). Remove the folder and download it again, "
                    f"or copy the official extracted 'cifar-100-python' folder there."
                ) from error
            raise DatasetMissing(
                f"CIFAR-100 ({split}) is not under {folder} and could not be downloaded ({error}). Download it "
                f"once with network access (download=True) or copy the extracted 'cifar-100-python' folder there."
            ) from error
        self.classnames = cifar100_classnames()
        self.templates = cifar_templates()
        self.labels = list(self.data.targets)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.data[index]
