"""Evaluating the CLTs of a bundle: cached results per CLT, shared by the evaluation scripts and the pipeline."""

from __future__ import annotations

from pathlib import Path

import torch

from .bundle import Bundle
from .clt import CrossLayerTranscoder
from .data import load_dataset, split_name
from .evaluate import evaluate_clt
from .storage import read_json, write_json
from .teacher import Teacher
from .zeroshot import ZeroShotClassifier

RESULTS = "evaluation/results.json"


def bundle_test_split(bundle: Bundle):
    """The held-out split of the bundle's dataset."""
    dataset = bundle.manifest["dataset"]
    split = dataset.get("test_split") or split_name(dataset["name"], "test")
    return load_dataset(dataset["name"], split, **dataset.get("options", {}))


def evaluate_bundle(bundle: Bundle, clts: list[str | Path] | None = None, max_images: int | None = None,
                    batch_size: int = 64, device: torch.device | str = "cpu", force: bool = False,
                    progress: bool = True, teacher: Teacher | None = None) -> dict[str, dict]:
    """Results per CLT (a name in the bundle, or a CLT folder evaluated on the bundle's teacher and data).
    A bundle CLT's results are read from its evaluation folder when present, unless ``force``."""
    names = clts or bundle.clt_names
    teacher = teacher or bundle.load_teacher(device)
    classifier, test_data, results = None, None, {}
    for name in names:
        if str(name) in bundle.clt_names:
            folder = bundle.clt_dir(str(name))
            clt = bundle.load_clt(str(name), teacher, device)
        else:
            folder = Path(name)
            clt = CrossLayerTranscoder.from_pretrained(folder, device=device)
        cached = folder / RESULTS
        if cached.is_file() and not force and (max_images is None or read_json(cached)["n_images"] == max_images):
            results[clt.config.sparsifier] = read_json(cached)
            continue
        if classifier is None:
            classifier = ZeroShotClassifier.load_or_build(teacher, bundle.classnames, bundle.templates,
                                                          bundle.zeroshot_path())
            test_data = bundle_test_split(bundle)
        result = evaluate_clt(teacher, clt, test_data, classifier, batch_size, max_images, progress=progress)
        result.update(dataset_labels(bundle))
        write_json(cached, result)
        results[clt.config.sparsifier] = result
    return results


def dataset_labels(bundle: Bundle) -> dict:
    """The dataset and backbone names a result is reported under."""
    settings = bundle.manifest.get("settings", {})
    return {"dataset": bundle.manifest["dataset"]["name"],
            "backbone": settings.get("backbone", bundle.manifest["teacher"]["model"])}
