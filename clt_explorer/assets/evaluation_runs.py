"""Evaluating the CLTs of a bundle: results cached per CLT in the bundle, shared by the scripts and the pipeline."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import load_dataset, split_name
from ..evaluation.evaluate import evaluate_clt
from ..model.clt import CrossLayerTranscoder
from ..model.teacher import Teacher
from ..storage import read_json, write_json
from .bundle import Bundle, evaluation_file


def bundle_test_split(bundle: Bundle):
    """The held-out split of the bundle's dataset."""
    dataset = bundle.manifest["dataset"]
    split = dataset.get("test_split") or split_name(dataset["name"], "test")
    return load_dataset(dataset["name"], split, **dataset.get("options", {}))


def evaluate_bundle(bundle: Bundle, clts: list[str | Path] | None = None, max_images: int | None = None,
                    batch_size: int = 64, device: torch.device | str = "cpu", force: bool = False,
                    progress: bool = True, teacher: Teacher | None = None) -> dict[str, dict]:
    """Results per CLT name (a CLT of the bundle, or a CLT folder evaluated on the bundle's teacher and data,
    named after the folder). A bundle CLT's results are read from the bundle when present, unless ``force``."""
    names = clts or bundle.clt_names
    teacher = teacher or bundle.load_teacher(device)
    classifier, test_data, results = None, None, {}
    for name in names:
        if str(name) in bundle.clt_names:
            key, cached = str(name), bundle.evaluation_path(str(name))
            clt = None
        else:
            key, cached = Path(name).name, evaluation_file(Path(name))
            clt = CrossLayerTranscoder.from_pretrained(name, device=device)
        if cached.is_file() and not force and (max_images is None or read_json(cached)["n_images"] == max_images):
            results[key] = read_json(cached)
            continue
        clt = clt or bundle.load_clt(key, teacher, device)
        if classifier is None:
            classifier, test_data = bundle.load_classifier(teacher), bundle_test_split(bundle)
        result = evaluate_clt(teacher, clt, test_data, classifier, batch_size, max_images, progress=progress)
        result.update(clt=key, **dataset_labels(bundle))
        write_json(cached, result)
        results[key] = result
    return results


def dataset_labels(bundle: Bundle) -> dict:
    """The dataset and backbone names a result is reported under."""
    settings = bundle.manifest.get("settings", {})
    return {"dataset": bundle.manifest["dataset"]["name"],
            "backbone": settings.get("backbone", bundle.manifest["teacher"]["model"])}
