"""COCO as single-label classification over its 80 object categories.

Label rule: an image's label is the category with the largest total annotated area in it (its
dominant object); crowd annotations count, images without annotations are left out. Images come
from a local images folder (e.g. ``val2017/``) and the matching ``instances_*.json``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .errors import DatasetMissing
from .folder import LabelledFiles
from .resources import cifar_templates

LABEL_RULE = "category with the largest total annotated area in the image; images without annotations skipped"


def coco(images: str | Path, annotations: str | Path) -> LabelledFiles:
    """Single-label COCO from an images folder and an instances annotation file."""
    images, annotations = Path(images), Path(annotations)
    if not annotations.is_file():
        raise DatasetMissing(f"COCO annotations not found: {annotations} (an instances_<split>.json file)")
    if not images.is_dir():
        raise DatasetMissing(f"COCO images folder not found: {images}")
    data = json.loads(annotations.read_text())
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    area: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for a in data["annotations"]:
        area[a["image_id"]][a["category_id"]] += float(a.get("area", 0.0))
    paths, labels = [], []
    for image in sorted(data["images"], key=lambda i: i["id"]):
        if image["id"] not in area:
            continue
        per_category = area[image["id"]]
        paths.append(images / image["file_name"])
        labels.append(label_of[max(per_category, key=per_category.get)])
    if not paths:
        raise DatasetMissing(f"{annotations} has no annotated images")
    missing = [p for p in paths[:20] if not p.is_file()]
    if missing:
        raise DatasetMissing(f"COCO image files are missing under {images} (e.g. {missing[0].name})")
    return LabelledFiles(paths, labels, [c["name"] for c in categories], cifar_templates())
