"""ImageNet-100 (the CMC subset) from a local ImageNet folder: ``root/<split>/<wnid>/*.JPEG``.

Class names are open_clip's ImageNet class names (looked up through the 1k synset order);
templates are OpenAI's 80 ImageNet prompt templates.
"""

from __future__ import annotations

from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from .errors import DatasetMissing
from .folder import LabelledFiles, list_images
from .resources import as_format_strings, imagenet1k_wnids, imagenet100_wnids


def imagenet100_classnames() -> list[str]:
    index = {wnid: i for i, wnid in enumerate(imagenet1k_wnids())}
    return [IMAGENET_CLASSNAMES[index[wnid]] for wnid in imagenet100_wnids()]


def imagenet100(root: str | Path, split: str = "val") -> LabelledFiles:
    """The 100 synsets' images of one split (``train`` or ``val``) of a local ImageNet copy."""
    folder = Path(root) / split
    wnids = imagenet100_wnids()
    missing = [w for w in wnids if not (folder / w).is_dir()]
    if missing:
        raise DatasetMissing(
            f"ImageNet-100 needs {folder}/<wnid>/ folders for its 100 synsets; {len(missing)} are missing "
            f"(first: {missing[:3]}). Point root at an ImageNet copy with class sub-folders in {split!r}."
        )
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        images = list_images(folder / wnid)
        paths += images
        labels += [label] * len(images)
    return LabelledFiles(paths, labels, imagenet100_classnames(), as_format_strings(OPENAI_IMAGENET_TEMPLATES))
