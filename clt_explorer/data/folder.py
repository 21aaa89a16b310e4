"""Any image folder in the ImageFolder layout: ``root/<split>/<class name>/<image files>``."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from .errors import DatasetMissing

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class LabelledFiles(Dataset):
    """Images on disk with integer labels; decodes an image only when it is asked for."""

    def __init__(self, paths: list[Path], labels: list[int], classnames: list[str], templates: list[str]):
        self.paths, self.labels = paths, labels
        self.classnames, self.templates = classnames, templates

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB"), self.labels[index]


def image_folder(root: str | Path, split: str = "train", templates: list[str] | None = None) -> LabelledFiles:
    """Classes are the sub-folders of ``root/split`` (sorted); their names, with '_' as spaces, are the class
    names for zero-shot prompts."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetMissing(f"image folder split {split!r} not found: expected {folder}/<class>/<images>")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DatasetMissing(f"{folder} has no class sub-folders (expected {folder}/<class>/<images>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        images = list_images(folder / name)
        paths += images
        labels += [label] * len(images)
    if not paths:
        raise DatasetMissing(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}/<class>/")
    return LabelledFiles(paths, labels, [c.replace("_", " ") for c in classes], templates or ["a photo of a {}."])
