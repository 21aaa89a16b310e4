"""Build complete bundles end to end: teacher, CLTs, retrieval indexes, feature statistics, evaluation, thumbnails.

Every step writes its outputs atomically and is skipped when they exist and load; CLT training
resumes from its latest checkpoint. In one process the shared steps come first, then each CLT's
steps in turn (train, index, feature statistics, evaluate, layer terms), so that the first CLT is
complete as early as possible. Under torchrun every rank trains every CLT first (the data is sharded)
and rank 0 alone does everything else and writes the bundle. Where files go is :class:`Bundle`'s business.
"""

from __future__ import annotations

import dataclasses
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data import Subset, load_dataset, split_name
from ..data.coco import LABEL_RULE
from ..model.clt import CLTConfig
from ..model.sparsifiers import SPARSIFIERS, sparsifier_class
from ..model.teacher import LOCAL_DIR, OPEN_CLIP_FILES, Teacher
from ..model.tokens import ALL, TOKEN_SETS
from ..model.zeroshot import ZeroShotClassifier, zero_shot_accuracy
from ..retrieval.build import COMPACT_DEFAULTS, build_retrieval, index_settings
from ..retrieval.features import build_feature_store
from ..retrieval.index import MODES, RetrievalIndex
from ..retrieval.quality import held_out_pixels
from ..retrieval.thumbnails import ThumbnailStore, build_thumbnails
from ..storage import atomic_path, read_json
from ..training.outputs import SUMMARY_FILE
from ..training.tiny_clip import train_tiny_clip
from ..training.train import TrainConfig, default_device, is_trained, train_clt, world
from .build_status import StatusWriter
from .bundle import LOCAL_TEACHER, Bundle, validate_name
from .evaluation_runs import evaluate_bundle, layer_terms_bundle, write_bundle_report
from .shipped import CLT_FILES, copy_files, shipped_accuracy, shipped_clt, shipped_teacher

TINY_TEACHER = "tiny-clip"
BACKBONES = {"ViT-B-32": ("ViT-B-32-quickgelu", "openai"), "ViT-B-16": ("ViT-B-16-quickgelu", "openai")}
DESCRIPTIONS = {TINY_TEACHER: "tiny CLIP trained on synthetic shapes", "ViT-B-32": "ViT-B/32 (OpenAI)",
                "ViT-B-16": "ViT-B/16 (OpenAI)"}
N_EXAMPLES = 8
RECALL_QUERIES = 200  # held-out images whose exact top-10 measures each index's recall


@dataclass
class BundleJob:
    """Everything needed to build one bundle. Each field's docstring is also its ``--help`` in train_all.py."""

    dataset: str
    """Dataset kind (see ``data.DATASETS``)."""
    backbone: str
    """ViT-B-32, ViT-B-16, tiny-clip, local-dir:PATH, or any open_clip ARCH:PRETRAINED (a tag or a .safetensors)."""
    sparsifiers: tuple[str, ...] = tuple(SPARSIFIERS)
    """One CLT per sparsifier kind, named after it."""
    dataset_options: dict = field(default_factory=dict)
    """Options of the dataset adapter (root folder, sizes)."""
    expansion: int = 16
    """Features per layer = expansion x d_model."""
    k: int = 128
    """Sparsity: active features per token (TopK) or L0 target (JumpReLU)."""
    train: TrainConfig = TrainConfig()
    """Optimisation settings of every CLT."""
    train_images: int | None = None
    """Train on a random subset of this many images (default: all)."""
    eval_images: int | None = None
    """Evaluate on the first N test images (default: all)."""
    retrieval_images: int | None = None
    """Index a random subset of N training images (default: all)."""
    retrieval_mode: str = "compact"
    """Retrieval index kind: compact (for the app) or exact (FAISS flat, large)."""
    retrieval_budget: float = COMPACT_DEFAULTS["budget"]
    """Bytes of a compact index (both tiers), as a share of the exact index's (more: higher recall)."""
    thumbnail_size: int = 96
    """Longest side of the training-image thumbnails, in pixels."""
    batch_size: int = 64
    """Images per teacher forward pass (evaluation, indexing)."""
    tiny_clip_steps: int = 600
    """Training steps of the offline tiny CLIP."""
    seed: int = 0
    """Seed of the image subsets and of the tiny CLIP."""
    shipped_weights: bool = True
    """Copy the tiny CLIP and the CLTs shipped with the package where this job asks for exactly what they were trained
    with (the demo preset does); train them otherwise."""

    def __post_init__(self):
        if self.retrieval_mode not in MODES:
            raise ValueError(f"retrieval_mode must be one of {MODES}, got {self.retrieval_mode!r}")
        for sparsifier in self.sparsifiers:
            sparsifier_class(sparsifier)

    @property
    def name(self) -> str:
        """``<dataset>-<backbone>``: a local folder by its name, ``ARCH:file.safetensors`` by the architecture and
        the file's stem, ``ARCH:TAG`` by both."""
        if self.backbone.startswith(LOCAL_DIR):
            backbone = Path(self.backbone[len(LOCAL_DIR):]).name
        else:
            model, _, pretrained = self.backbone.partition(":")
            weights = Path(pretrained).stem if pretrained.endswith(".safetensors") else pretrained
            backbone = f"{model}-{weights}" if weights else model
        return validate_name(f"{self.dataset}-{backbone.replace('/', '-').replace(':', '-')}".lower(), "bundle name")

    @property
    def teacher_description(self) -> str:
        """What the teacher is, in words (shown by the app, the report and the model card)."""
        if self.backbone in DESCRIPTIONS:
            return DESCRIPTIONS[self.backbone]
        if self.backbone.startswith(LOCAL_DIR):
            return f"open_clip model from the folder {Path(self.backbone[len(LOCAL_DIR):]).name}"
        model, _, pretrained = self.backbone.partition(":")
        if pretrained.endswith(".safetensors"):
            return f"{model} with the weights {Path(pretrained).name}"
        return f"{model} ({pretrained})" if pretrained else f"{model} (random weights)"

    def teacher_spec(self) -> tuple[str, str | None]:
        """(open_clip model name, pretrained tag) of the backbone; ``ARCH:TAG`` names any open_clip model.
        The tiny CLIP and a ``local-dir:`` teacher live in the bundle's own teacher folder."""
        if self.backbone == TINY_TEACHER or self.backbone.startswith(LOCAL_DIR):
            return LOCAL_TEACHER, None
        if self.backbone in BACKBONES:
            return BACKBONES[self.backbone]
        model, _, pretrained = self.backbone.partition(":")
        return model, pretrained or None


@dataclass
class StepReport:
    bundle: str
    step: str
    status: str  # built | skipped | failed
    seconds: float = 0.0
    detail: str = ""


class Builder:
    """Runs the steps of one bundle and records what happened to each."""

    def __init__(self, job: BundleJob, out_root: Path, device: torch.device, progress: bool,
                 status: StatusWriter | None = None):
        self.job, self.device, self.progress, self.status = job, device, progress, status
        self.root = out_root / job.name
        self.reports: list[StepReport] = []
        self.rank, self.world_size = world()

    def step(self, name: str, done: Callable[[], bool], run: Callable[[], str | None], every_rank: bool = False
             ) -> bool:
        """Run ``run`` unless ``done()``; returns whether the step's outputs exist afterwards. A step that every rank
        runs under torchrun goes by rank 0's ``done()``: a rank that looked later could find rank 0's fresh outputs,
        skip the step and leave rank 0 waiting at the step's barrier."""
        start = time.time()
        if self.status:
            self.status.started(name)
        try:
            if self._agreed(done()) if every_rank else done():
                self._report(StepReport(self.job.name, name, "skipped", 0.0, "already complete"))
                return True
            detail = run() or ""
            self._report(StepReport(self.job.name, name, "built", time.time() - start, detail))
            return True
        except Exception as error:  # one failed step must not lose the others; the summary says why
            self._failed(name, error, time.time() - start)
            return False

    def _agreed(self, done: bool) -> bool:
        """Rank 0's ``done`` on every rank (itself without torchrun)."""
        if self.world_size == 1:
            return done
        decision = [done]
        torch.distributed.broadcast_object_list(decision, src=0)
        return decision[0]

    def _report(self, report: StepReport) -> None:
        self.reports.append(report)
        if self.status:
            self.status.finished(report)

    def _failed(self, name: str, error: Exception, seconds: float = 0.0) -> None:
        self._report(StepReport(self.job.name, name, "failed", seconds, f"{type(error).__name__}: {error}"))
        if self.progress:
            traceback.print_exc()

    def build(self) -> list[StepReport]:
        job = self.job
        try:
            train_data, test_data = self._dataset("train"), self._dataset("test")
        except Exception as error:  # e.g. a dataset that is not on disk and cannot be downloaded
            self._failed("load data", error)
            return self.reports
        bundle = self._bundle(test_data)
        if job.backbone == TINY_TEACHER and not self.step("teacher", lambda: self._teacher_done(bundle),
                                                         lambda: self._train_tiny_teacher(bundle, test_data), True):
            return self.reports
        if job.backbone.startswith(LOCAL_DIR) and not self.step(
                "teacher", lambda: self._teacher_done(bundle),
                lambda: self._copy_teacher(bundle, Path(job.backbone[len(LOCAL_DIR):])), True):
            return self.reports
        try:
            teacher = self._teacher(bundle)
        except Exception as error:  # e.g. pretrained weights that cannot be downloaded: the summary says so
            self._failed("load teacher", error)
            return self.reports
        training_set = (train_data if job.train_images is None
                        else Subset(train_data, self._subset(train_data, job.train_images)))
        names = list(job.sparsifiers)
        if self.world_size > 1:  # every rank trains; rank 0 alone goes on
            names = [name for name in names if self._train_step(bundle, teacher, training_set, name)]
            if self.rank != 0:
                return self.reports
        self.step("zero-shot classifier", lambda: bundle.zeroshot_path() is not None,
                  lambda: self._zeroshot(bundle, teacher))
        self.step("examples", lambda: bundle.has_examples, lambda: self._examples(bundle, test_data))
        indices = self._subset(train_data, job.retrieval_images)
        self.step("thumbnails", lambda: self._thumbnails_done(bundle, len(indices)),
                  lambda: self._thumbnails(bundle, train_data, indices))
        for name in names:
            if self.world_size == 1 and not self._train_step(bundle, teacher, training_set, name):
                continue
            self._clt_steps(bundle, teacher, train_data, test_data, indices, name)
        self.step("report", lambda: self._report_written(bundle), lambda: self._write_report(bundle, teacher))
        return self.reports

    def _train_step(self, bundle: Bundle, teacher: Teacher, data, name: str) -> bool:
        return self.step(f"train {name}", lambda: is_trained(bundle.clt_dir(name)),
                         lambda: self._train(bundle, teacher, data, name), every_rank=True)

    def _clt_steps(self, bundle: Bundle, teacher: Teacher, train_data, test_data, indices: list[int],
                   name: str) -> None:
        """Everything after training one CLT (a CLT is loaded only by a step that runs, not to find a step
        complete). The CLT is registered once it has its index, so that the app never sees it half made."""
        self.step(f"retrieval {name}", lambda: self._retrieval_done(bundle, name, len(indices)),
                  lambda: self._retrieval(bundle, teacher, train_data, test_data, indices, name))
        bundle.add_clt(name)
        self.step(f"features {name}", lambda: bundle.load_feature_store(name, len(indices)) is not None,
                  lambda: self._features(bundle, teacher, train_data, indices, name))
        self.step(f"evaluate {name}", lambda: bundle.evaluation_path(name).is_file(),
                  lambda: self._evaluate(bundle, teacher, name))
        bundle.set_evaluation_summary({n: evaluation_summary(bundle.evaluation(n)) for n in bundle.clt_names
                                       if bundle.evaluation_path(n).is_file()})
        self.step(f"layer terms {name}", lambda: bundle.layer_terms_path(name).is_file(),
                  lambda: self._layer_terms(bundle, teacher, name))

    # ---- steps ---------------------------------------------------------------------------------------

    def _teacher_done(self, bundle: Bundle) -> bool:
        return all((bundle.teacher_dir / name).is_file() for name in OPEN_CLIP_FILES)

    def _train_tiny_teacher(self, bundle: Bundle, test_data) -> str | None:
        shipped = shipped_teacher(self.job)
        if shipped is not None:
            self._copy_teacher(bundle, shipped)
            return f"copied the shipped tiny CLIP; zero-shot top-1 on the test split {100 * shipped_accuracy():.1f}%"
        detail = None
        if self.rank == 0:
            start = time.time()
            teacher = train_tiny_clip(bundle.teacher_dir, steps=self.job.tiny_clip_steps, seed=self.job.seed,
                                      progress=self.progress)
            seconds = time.time() - start
            accuracy = zero_shot_accuracy(teacher, test_data, 4 * self.job.batch_size, self.progress)
            detail = f"trained in {seconds:.0f} s; zero-shot top-1 on the test split {100 * accuracy:.1f}%"
        if self.world_size > 1:
            torch.distributed.barrier()
        return detail

    def _copy_teacher(self, bundle: Bundle, source: Path) -> str:
        """A local open_clip folder becomes part of the bundle, which then stands on its own."""
        if self.rank == 0:
            for name in OPEN_CLIP_FILES:
                if not (source / name).is_file():
                    raise FileNotFoundError(f"{source / name} is missing")
            copy_files(source, bundle.teacher_dir, OPEN_CLIP_FILES)  # the config, copied last, marks completion
        if self.world_size > 1:
            torch.distributed.barrier()
        return f"copied from {source}"

    def _teacher(self, bundle: Bundle) -> Teacher:
        """The teacher (pretrained weights are downloaded when online)."""
        return bundle.load_teacher(self.device)

    def _dataset(self, which: str):
        return load_dataset(self.job.dataset, split_name(self.job.dataset, which), **self.job.dataset_options)

    def _subset(self, data, n: int | None) -> list[int]:
        """A fixed random subset of ``n`` indices (all of them when n is None), in increasing order."""
        n = len(data) if n is None else min(n, len(data))
        return sorted(np.random.default_rng(self.job.seed).permutation(len(data))[:n].tolist())

    def _bundle(self, test_data) -> Bundle:
        """The bundle manifest: read back when present (it keeps what earlier runs registered). Only rank 0
        writes it; the other ranks use it for paths."""
        if Bundle.exists(self.root):
            bundle = Bundle.load(self.root)
        else:
            job = self.job
            model, pretrained = job.teacher_spec()
            dataset = {"name": job.dataset, "options": job.dataset_options,
                       "classnames": list(test_data.classnames), "templates": list(test_data.templates),
                       "train_split": split_name(job.dataset, "train"), "test_split": split_name(job.dataset, "test")}
            if job.dataset == "coco":
                dataset["label_rule"] = LABEL_RULE
            teacher = {"model": model, "description": job.teacher_description,
                       **({"pretrained": pretrained} if pretrained else {})}
            bundle = Bundle.create(self.root, job.name, teacher, dataset)
        if self.rank == 0:
            bundle.set_settings(_settings(self.job))
        return bundle

    def _zeroshot(self, bundle: Bundle, teacher: Teacher) -> str:
        """Cache the class text embeddings in the bundle (the app then starts without the text tower's work)."""
        classifier = ZeroShotClassifier.build(teacher, bundle.classnames, bundle.templates)
        classifier.save(bundle.zeroshot_file, teacher)
        bundle.set_zeroshot()
        return f"{len(classifier.templates)} templates x {len(classifier.classnames)} classes"

    def _train(self, bundle: Bundle, teacher: Teacher, data, name: str) -> str:
        job = self.job
        shipped = shipped_clt(job, name, teacher)
        if shipped is not None:
            if self.rank == 0:
                copy_files(shipped, bundle.clt_dir(name), CLT_FILES)
            if self.world_size > 1:
                torch.distributed.barrier()
            summary = read_json(bundle.clt_dir(name) / SUMMARY_FILE)
            return f"copied the shipped CLT ({summary['steps']} steps, {summary['tokens']} tokens)"
        config = CLTConfig(teacher.n_layers, teacher.d_model, job.expansion, name, job.k)
        result = train_clt(teacher, data, config, job.train, bundle.clt_dir(name), self.progress)
        resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
        return f"{result.steps} steps, {result.tokens} tokens in {result.seconds:.0f} s{resumed}"

    def _examples(self, bundle: Bundle, test_data) -> str:
        """A few test images for the app: the first image of classes spread evenly over the class list."""
        first = {}
        for index, label in enumerate(test_data.labels):
            first.setdefault(label, index)
        present = sorted(first)
        wanted = [present[i * len(present) // N_EXAMPLES] for i in range(min(N_EXAMPLES, len(present)))]
        for n, label in enumerate(wanted):
            image, label = test_data[first[label]]
            name = re.sub(r"[^A-Za-z0-9_-]", "_", test_data.classnames[label])
            with atomic_path(bundle.examples_dir / f"{n:02d}_{name}.png") as tmp:
                image.convert("RGB").save(tmp, format="PNG")
        bundle.set_examples()
        return f"{len(wanted)} test images"

    def _thumbnails_done(self, bundle: Bundle, count: int) -> bool:
        return bundle.has_thumbnails and len(ThumbnailStore(bundle.thumbnails_dir)) == count

    def _thumbnails(self, bundle: Bundle, train_data, indices: list[int]) -> str:
        store = build_thumbnails(train_data, indices, bundle.thumbnails_dir, self.job.thumbnail_size,
                                 split=split_name(self.job.dataset, "train"), progress=self.progress)
        bundle.set_thumbnails()
        return f"{len(store)} images, {store.offsets[-1] / 1e6:.1f} MB"

    def _evaluate(self, bundle: Bundle, teacher: Teacher, name: str) -> str:
        results = evaluate_bundle(bundle, [name], self.job.eval_images, self.job.batch_size, self.device,
                                  force=True, progress=self.progress, teacher=teacher,
                                  num_workers=self.job.train.num_workers)[name]
        return f"{results['n_images']} images, baseline {results['cascade']['baseline']:.2f}%"

    def _layer_terms(self, bundle: Bundle, teacher: Teacher, name: str) -> str:
        result = layer_terms_bundle(bundle, [name], self.job.eval_images, self.job.batch_size, self.device,
                                    force=True, progress=self.progress, teacher=teacher,
                                    num_workers=self.job.train.num_workers)[name]
        return "; ".join(f"{tokens}: top-1 removal {r['top1_removal_drop']['dataset']:+.2f} points, "
                         f"Spearman {r['spearman_c_vs_drop']:.2f}" for tokens, r in result["tokens"].items())

    def _report_written(self, bundle: Bundle) -> bool:
        """The report is newer than every result it shows."""
        results = [path for name in bundle.clt_names
                   for path in (bundle.evaluation_path(name), bundle.layer_terms_path(name)) if path.is_file()]
        return bundle.report_path.is_file() and all(bundle.report_path.stat().st_mtime >= path.stat().st_mtime
                                                     for path in results)

    def _write_report(self, bundle: Bundle, teacher: Teacher) -> str:
        evaluated = [name for name in bundle.clt_names if bundle.layer_terms_path(name).is_file()]
        if not evaluated:
            return "nothing evaluated yet"
        written = write_bundle_report(bundle, clts=evaluated, teacher=teacher, device=self.device,
                                      progress=self.progress, num_workers=self.job.train.num_workers)
        images = sum(path.suffix in (".png", ".svg") for path in written)
        return f"{bundle.report_path.relative_to(bundle.root)}, {images} images"

    def _loader_workers(self, teacher: Teacher) -> int:
        """Image-loading workers of a pass over the training images (``TrainConfig.num_workers``, or the device's)."""
        return self.job.train.loader_workers(self.device, teacher.pixel_bytes(self.job.batch_size))

    def _features(self, bundle: Bundle, teacher: Teacher, train_data, indices: list[int], name: str) -> str:
        """Per-feature statistics over the retrieval corpus (the app's feature cards)."""
        store = build_feature_store(teacher, bundle.load_clt(name, teacher, self.device), train_data, indices,
                                    bundle.features_dir(name), batch_size=self.job.batch_size,
                                    num_workers=self._loader_workers(teacher), progress=self.progress)
        return f"{store.n_images} images, top {store.top_n} per feature, {store.nbytes / 1e6:.1f} MB"

    def _retrieval_settings(self) -> dict:
        """What this job's indexes are built with (an exact index has no settings, whatever the budget)."""
        return index_settings(self.job.retrieval_mode, budget=self.job.retrieval_budget)

    def _retrieval_done(self, bundle: Bundle, name: str, count: int) -> bool:
        """Whether the CLT's indexes exist, built in this job's mode with its settings: an index of another mode or
        budget, or of an earlier version's defaults, is built again."""
        if not RetrievalIndex.exists(bundle.retrieval_dir(name)):
            return False
        config = bundle.clt_config(name)
        index = RetrievalIndex.load(bundle.retrieval_dir(name), config.n_layers, config.n_features, count)
        return index.built_with(self.job.retrieval_mode, self._retrieval_settings())

    def _retrieval(self, bundle: Bundle, teacher: Teacher, train_data, test_data, indices: list[int],
                   name: str) -> str:
        """The indexes, with their recall@10 against exact search measured on held-out images in the same pass."""
        clt = bundle.load_clt(name, teacher, self.device)
        queries = held_out_pixels(teacher, test_data, RECALL_QUERIES, self.job.batch_size)
        index = build_retrieval(teacher, clt, train_data, indices, self.job.retrieval_mode,
                                batch_size=self.job.batch_size, num_workers=self._loader_workers(teacher),
                                progress=self.progress, recall_queries=queries,
                                **self._retrieval_settings())
        index.save(bundle.retrieval_dir(name))
        recall = [r for per_layer in index.settings["recall_at_10"].values() for r in per_layer]
        return f"{index.mode}, {index.n_images} images, {index.nbytes / 1e6:.1f} MB, recall@10 >= {min(recall):.3f}"


def evaluation_summary(results: dict) -> dict:
    """The headline figures of one CLT's evaluation."""
    cascade = results["cascade"]
    reconstruction = results["reconstruction"][ALL]
    return {
        "n_images": results["n_images"],
        "baseline_accuracy": cascade["baseline"],
        "mean_r2": sum(reconstruction["r2"]) / len(reconstruction["r2"]),
        "mean_l0": sum(results["l0"]) / len(results["l0"]),
        "accuracy_full_cascade": {tokens: cascade[tokens][0]["accuracy"] for tokens in TOKEN_SETS
                                  if tokens in cascade},
    }


def _settings(job: BundleJob) -> dict:
    """The job's settings as the manifest records them (the dataset and the CLTs are recorded on their own)."""
    return {key: value for key, value in dataclasses.asdict(job).items()
            if key not in ("dataset", "dataset_options", "sparsifiers")}


def build_bundles(jobs: list[BundleJob], out_root: str | Path, device: torch.device | None = None,
                  progress: bool = True, status: StatusWriter | None = None) -> list[StepReport]:
    """Build every job's bundle under ``out_root``; returns one report per step (also told to ``status``)."""
    device = device or default_device()
    reports = []
    for job in jobs:
        reports += Builder(job, Path(out_root), device, progress, status).build()
    return reports


SYNTHETIC_OPTIONS = {"n_train": 20000, "n_test": 2000, "image_size": 64}
DEFAULT_DATA_ROOT = Path.home() / ".cache" / "clt-explorer" / "data"

PRESETS: dict[str, dict] = {
    # the offline default: tiny CLIP on synthetic shapes, CPU-sized (the first CLT in under two minutes on 2 cores)
    "demo": {"datasets": ["synthetic"], "backbones": [TINY_TEACHER],
             "job": {"expansion": 8, "k": 32, "eval_images": 2000, "retrieval_images": 10000, "thumbnail_size": 64,
                     "batch_size": 250,
                     # its images are drawn in memory, in the main process (as the shipped CLTs' recipes say)
                     "train": TrainConfig(epochs=1, lr=2e-3, batch_tokens=2048, chunk_images=512, warmup_steps=20,
                                          dead_after_tokens=200_000, checkpoint_every=100, num_workers=0)}},
    # real CLIP ViT-B/32 on a CIFAR-100 subset: one consumer GPU, or a patient CPU
    "quick": {"datasets": ["cifar100"], "backbones": ["ViT-B-32"],
              "job": {"expansion": 8, "k": 128, "train_images": 10000, "eval_images": 2000,
                      "retrieval_images": 10000, "train": TrainConfig(epochs=1)}},
    # the paper's settings and grid
    "paper": {"datasets": ["cifar100", "coco", "imagenet100"], "backbones": ["ViT-B-32", "ViT-B-16"],
              "job": {"expansion": 16, "k": 128, "train": TrainConfig(epochs=10, lr=2e-4)}},
}


def dataset_options(dataset: str, data_root: str | Path | None) -> dict:
    """Options of a dataset kind: the synthetic set's sizes, or the folder real datasets live in."""
    if dataset == "synthetic":
        return dict(SYNTHETIC_OPTIONS)
    return {"root": str(data_root or DEFAULT_DATA_ROOT / dataset)}


def preset_jobs(preset: str, datasets: list[str] | None = None, backbones: list[str] | None = None,
                data_root: str | Path | None = None, train_overrides: dict | None = None,
                **overrides) -> list[BundleJob]:
    """The grid of a preset (datasets x backbones), with any setting overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    chosen = PRESETS[preset]
    settings = {**chosen["job"], **overrides}
    train = dataclasses.replace(settings.pop("train", TrainConfig()), **(train_overrides or {}))
    return [BundleJob(dataset=d, backbone=b, train=train, dataset_options=dataset_options(d, data_root), **settings)
            for d in datasets or chosen["datasets"] for b in backbones or chosen["backbones"]]
