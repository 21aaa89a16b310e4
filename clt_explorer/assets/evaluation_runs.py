"""Evaluating the CLTs of a bundle: results cached per CLT in the bundle, shared by the scripts and the pipeline.

A CLT is named by its name in the bundle, or given as a folder (evaluated on the bundle's teacher and data,
named after the folder, its results kept in that folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..data import load_dataset, loader_workers, split_name
from ..evaluation.evaluate import RESULTS_VERSION as EVALUATION_VERSION
from ..evaluation.evaluate import evaluate_clt
from ..evaluation.layer_terms import RESULTS_VERSION as LAYER_TERMS_VERSION
from ..evaluation.layer_terms import run_layer_terms
from ..evaluation.report import write_report
from ..model.clt import CrossLayerTranscoder
from ..model.teacher import Teacher
from ..retrieval.exact import exact_neighbours
from ..retrieval.grids import DESCRIPTOR_TITLES, retrieval_grid
from ..storage import atomic_path, read_json, write_json
from .bundle import Bundle, evaluation_file, layer_terms_file


def bundle_split(bundle: Bundle, which: str = "test"):
    """The held-out (``test``) or training (``train``) split of the bundle's dataset."""
    dataset = bundle.manifest["dataset"]
    split = dataset.get(f"{which}_split") or split_name(dataset["name"], which)
    return load_dataset(dataset["name"], split, **dataset.get("options", {}))


def bundle_test_split(bundle: Bundle):
    """The held-out split of the bundle's dataset."""
    return bundle_split(bundle, "test")


def write_retrieval_grids(bundle: Bundle, out: Path, clts: list[str] | None = None, n_queries: int = 3, k: int = 3,
                          batch_size: int = 64, device: torch.device | str = "cpu", progress: bool = True,
                          num_workers: int | None = None) -> list[Path]:
    """Figures 4 and 5 for the bundle: per CLT and example image, the top-k training images of every layer by exact
    search over the indexed corpus, for the CLS code and for the patch-mean code (``grid_<clt>_<n>_<tokens>.png``).
    The corpus loads in ``num_workers`` processes (default: the device's, :func:`data.loader_workers`)."""
    thumbnails = bundle.load_thumbnails()
    examples = bundle.examples()[:n_queries]
    if thumbnails is None or not examples:
        return []
    teacher, train = bundle.load_teacher(device), bundle_split(bundle, "train")
    images = [Image.open(path).convert("RGB") for path in examples]
    workers = loader_workers(device, teacher.pixel_bytes(batch_size), num_workers)
    written = []
    for name in clts or bundle.clt_names:
        clt = bundle.load_clt(name, teacher, device)
        found = exact_neighbours(teacher, clt, train, thumbnails.dataset_indices, teacher.preprocess_images(images),
                                 k, batch_size, workers, progress)
        for q, (path, image) in enumerate(zip(examples, images)):
            for tokens, neighbours in found.items():
                title = f"{name}: top-{k} per layer by the {DESCRIPTOR_TITLES[tokens]} ({path.stem})"
                target = out / f"grid_{name}_{q}_{tokens}.png"
                with atomic_path(target) as tmp:
                    retrieval_grid(image, neighbours, q, thumbnails, bundle.classnames, title).save(tmp, format="PNG")
                written.append(target)
    return written


def _clt_folder(bundle: Bundle, name: str | Path) -> tuple[str, Path]:
    """(key, folder) of a bundle CLT's name or of a CLT folder."""
    if str(name) in bundle.clt_names:
        return str(name), bundle.clt_dir(str(name))
    return Path(name).name, Path(name)


class CachedRuns:
    """Results per CLT of one kind of run, read from the CLT's folder when present and matching, else computed
    (with the teacher, classifier and test split loaded once, on first need) and written there."""

    def __init__(self, bundle: Bundle, device: torch.device | str, teacher: Teacher | None, batch_size: int,
                 num_workers: int | None):
        self.bundle, self.device, self._teacher = bundle, device, teacher
        self.batch_size, self._num_workers = batch_size, num_workers
        self._classifier = self._test_data = None

    @property
    def teacher(self) -> Teacher:
        self._teacher = self._teacher or self.bundle.load_teacher(self.device)
        return self._teacher

    @property
    def num_workers(self) -> int:
        """Image-loading workers of a pass over the held-out split (the given count, or the device's)."""
        return loader_workers(self.device, self.teacher.pixel_bytes(self.batch_size), self._num_workers)

    def inputs(self):
        """The teacher, the zero-shot classifier and the held-out split."""
        if self._classifier is None:
            self._classifier = self.bundle.load_classifier(self.teacher)
            self._test_data = bundle_test_split(self.bundle)
        return self.teacher, self._classifier, self._test_data

    def load_clt(self, key: str, folder: Path) -> CrossLayerTranscoder:
        if key in self.bundle.clt_names:
            return self.bundle.load_clt(key, self.teacher, self.device)
        return self.bundle.check_clt(CrossLayerTranscoder.from_pretrained(folder, device=self.device), self.teacher,
                                     folder)

    def run(self, names: list[str | Path], file_of: Callable[[Path], Path], matches: Callable[[dict], bool],
            compute: Callable[[str, Path], dict], force: bool) -> dict[str, dict]:
        results = {}
        for name in names:
            key, folder = _clt_folder(self.bundle, name)
            cached = file_of(folder)
            if cached.is_file() and not force and matches(read_json(cached)):
                results[key] = read_json(cached)
                continue
            results[key] = {**compute(key, folder), "clt": key, **dataset_labels(self.bundle)}
            write_json(cached, results[key])
        return results


def evaluate_bundle(bundle: Bundle, clts: list[str | Path] | None = None, max_images: int | None = None,
                    batch_size: int = 64, device: torch.device | str = "cpu", force: bool = False,
                    progress: bool = True, teacher: Teacher | None = None, num_workers: int | None = None
                    ) -> dict[str, dict]:
    """Every measurement of :func:`evaluate_clt` per CLT (cached unless ``force``); the held-out images load in
    ``num_workers`` processes (default: the device's, :func:`data.loader_workers`)."""
    runs = CachedRuns(bundle, device, teacher, batch_size, num_workers)

    def compute(key: str, folder: Path) -> dict:
        teacher, classifier, test_data = runs.inputs()
        return evaluate_clt(teacher, runs.load_clt(key, folder), test_data, classifier, batch_size, max_images,
                            num_workers=runs.num_workers, progress=progress)

    def matches(result: dict) -> bool:
        return result.get("version") == EVALUATION_VERSION and max_images in (None, result["n_images"])

    return runs.run(clts or bundle.clt_names, evaluation_file, matches, compute, force)


def layer_terms_bundle(bundle: Bundle, clts: list[str | Path] | None = None, max_images: int | None = None,
                       batch_size: int = 64, device: torch.device | str = "cpu", force: bool = False,
                       progress: bool = True, teacher: Teacher | None = None, start: int | None = None,
                       num_workers: int | None = None) -> dict[str, dict]:
    """The layer-term experiment per CLT (cached unless ``force``), ranked by the dataset's C of each CLT's
    evaluation (evaluated first when needed), for every token set the evaluation has C for; the held-out images load
    as in :func:`evaluate_bundle`."""
    names = clts or bundle.clt_names
    evaluations = evaluate_bundle(bundle, names, max_images, batch_size, device, progress=progress, teacher=teacher,
                                  num_workers=num_workers)
    runs = CachedRuns(bundle, device, teacher, batch_size, num_workers)

    def compute(key: str, folder: Path) -> dict:
        teacher, classifier, test_data = runs.inputs()
        contributions = evaluations[key]["contributions"]
        return run_layer_terms(teacher, runs.load_clt(key, folder), test_data, classifier, contributions,
                               list(contributions), start, batch_size, max_images, num_workers=runs.num_workers,
                               progress=progress)

    def matches(result: dict) -> bool:
        return (result.get("version") == LAYER_TERMS_VERSION and max_images in (None, result["n_images"])
                and start in (None, result["start"]))

    return runs.run(names, layer_terms_file, matches, compute, force)


def bundle_about(bundle: Bundle) -> dict:
    """What the bundle is, for its report: facts, its CLTs and the settings it was built with."""
    m = bundle.manifest
    dataset = m["dataset"]
    facts = {"bundle": bundle.name, "teacher": f"{bundle.teacher_description} ({m['teacher']['model']})",
             "dataset": f"{dataset['name']}: {len(dataset['classnames'])} classes, {len(dataset['templates'])} "
                        f"prompt templates", "created": m.get("created", "")}
    thumbnails = bundle.load_thumbnails()
    if thumbnails is not None:
        facts["indexed training images"] = len(thumbnails)
    clts = []
    for name in bundle.clt_names:
        c = bundle.clt_config(name)
        clts.append({"CLT": name, "sparsifier": c.sparsifier, "layers": c.n_layers, "width d": c.d_model,
                     "features per layer": c.n_features, "k": c.k, "parameters": f"{c.n_parameters / 1e6:.1f}M"})
    return {"name": bundle.name, "facts": facts, "clts": clts, "settings": m.get("settings", {})}


def write_bundle_report(bundle: Bundle, out: Path | None = None, clts: list[str] | None = None,
                        grids: list[Path] = (), primary: str | None = None,
                        image_formats: tuple[str, ...] = ("png", "svg"), **runs) -> list[Path]:
    """The bundle's report (tables, figures, report.html) into ``out`` (default: the bundle's report folder), from
    its evaluation and layer-term results (computed first where missing; ``runs`` go to both)."""
    results = evaluate_bundle(bundle, clts, **runs)
    terms = layer_terms_bundle(bundle, clts, **runs)
    return write_report(results, out or bundle.report_dir, primary, terms, bundle_about(bundle), list(grids),
                        image_formats)


def dataset_labels(bundle: Bundle) -> dict:
    """The dataset and backbone names a result is reported under."""
    settings = bundle.manifest.get("settings", {})
    return {"dataset": bundle.manifest["dataset"]["name"],
            "backbone": settings.get("backbone", bundle.manifest["teacher"]["model"])}
