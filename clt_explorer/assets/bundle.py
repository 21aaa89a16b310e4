"""The asset bundle: a folder (or a Hub repo with the same files) that the app and the scripts read.

This module is the only one that knows the layout; everything else asks :class:`Bundle` for paths.

    bundle.json                          manifest (below)
    teacher/                             open_clip folder of a local teacher (config + safetensors), if any
    clts/<name>/                         a CLT: config.json + model.safetensors (+ training.json, train_log.jsonl)
    clts/<name>/evaluation/results.json  its evaluation (reconstruction, cascades, faithfulness, contributions)
    clts/<name>/evaluation/layer_terms.json  the layer-term experiment (remove / retain source terms)
    clts/<name>/retrieval/               its per-layer retrieval indexes
    clts/<name>/features/                its per-feature statistics (firing rates, top images, patch maps)
    thumbnails/                          training-image thumbnails (row i of every index is thumbnail i)
    examples/                            a few test images for the app (PNG)
    zeroshot.safetensors                 cached class text embeddings (saves the app minutes at start-up)
    report/report.html                   the bundle's report, one page readable offline (+ its tables and figures)
    build_status.json, build.log         while the app builds its default bundle: what the build is doing

bundle.json names the teacher (open_clip architecture + pretrained tag, or ``local-dir:teacher``
relative to the bundle), the dataset (adapter name, options, class names, templates) and, per CLT
name, its folder. A CLT's name is not its sparsifier: two CLTs may share one. Every relative path
must stay inside the bundle. The manifest changes only through the typed methods below.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..model.clt import CONFIG_FILE, WEIGHTS_FILE, CLTConfig, CrossLayerTranscoder
from ..model.teacher import LOCAL_DIR, Teacher
from ..model.zeroshot import ZeroShotClassifier
from ..retrieval.features import FeatureStore
from ..retrieval.index import RetrievalIndex
from ..retrieval.thumbnails import ThumbnailStore
from ..storage import AssetError, check_keys, download_snapshot, is_repo_id, read_json, write_json
from ..training.outputs import LOG_FILE

MANIFEST = "bundle.json"
TEACHER_DIR = "teacher"
LOCAL_TEACHER = LOCAL_DIR + TEACHER_DIR  # the manifest's name of a teacher that lives inside the bundle
CLTS_DIR = "clts"
EVALUATION_FILE = "evaluation/results.json"
LAYER_TERMS_FILE = "evaluation/layer_terms.json"
RETRIEVAL_DIR = "retrieval"
FEATURES_DIR = "features"
THUMBNAILS_DIR = "thumbnails"
EXAMPLES_DIR = "examples"
ZEROSHOT_FILE = "zeroshot.safetensors"
REPORT_DIR = "report"
REPORT_FILE = "report.html"
BUILD_STATUS_FILE = "build_status.json"
BUILD_LOG_FILE = "build.log"
BUILD_LOCK_FILE = ".build.lock"
FORMAT = "clt-explorer-bundle"
VERSION = 1
HF_PREFIX = "hf://"
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")

_TOP_KEYS = {"format", "version", "name", "teacher", "dataset", "clts"}
_OPTIONAL_KEYS = {"created", "description", "thumbnails", "examples", "zeroshot", "evaluation", "settings"}
_TEACHER_KEYS = {"model"}
_TEACHER_OPTIONAL = {"pretrained", "identity", "description"}
_DATASET_KEYS = {"name", "classnames", "templates"}
_DATASET_OPTIONAL = {"options", "train_split", "test_split", "label_rule"}


def find_bundles(folder: str | Path) -> list[Path]:
    """The bundle folders directly inside ``folder``, by name."""
    return sorted(path.parent for path in Path(folder).glob(f"*/{MANIFEST}"))


def build_status_file(root: str | Path) -> Path:
    """Where a build started by the app reports its progress (beside the manifest, before there is one)."""
    return Path(root) / BUILD_STATUS_FILE


def build_log_file(root: str | Path) -> Path:
    """Where a build started by the app writes its output."""
    return Path(root) / BUILD_LOG_FILE


def build_lock_file(root: str | Path) -> Path:
    """The lock that keeps two builds from writing one bundle at once."""
    return Path(root) / BUILD_LOCK_FILE


def evaluation_file(clt_folder: Path) -> Path:
    """Where the evaluation results of the CLT in ``clt_folder`` are kept (in a bundle or not)."""
    return clt_folder / EVALUATION_FILE


def layer_terms_file(clt_folder: Path) -> Path:
    """Where the layer-term experiment's results of the CLT in ``clt_folder`` are kept (in a bundle or not)."""
    return clt_folder / LAYER_TERMS_FILE


def validate_name(name: str, what: str = "name") -> str:
    """Names used as folder names: letters, digits, '_', '-', '.', no leading dot, no separators."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise AssetError(f"invalid {what} {name!r}: use letters, digits, '_', '-' and '.' only")
    return name


def validate_repo_id(repo_id: str) -> str:
    """A Hugging Face Hub repo id ``owner/name``."""
    if not is_repo_id(repo_id):
        raise AssetError(f"invalid Hub repo id {repo_id!r}: expected owner/name")
    return repo_id


def inside(root: Path, relative: str, where: str) -> Path:
    """``root / relative``, refusing absolute paths and any path that leaves ``root``."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise AssetError(f"{where}: {relative!r} must be a relative path inside the bundle")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise AssetError(f"{where}: {relative!r} leaves the bundle folder")
    return path


class Bundle:
    """A bundle folder and its manifest."""

    def __init__(self, root: str | Path, manifest: dict):
        self.root = Path(root).resolve()  # as the paths the manifest names are, so that they compare
        self.manifest = manifest
        self.validate()

    # ---- creation and persistence ----------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, name: str, teacher: dict, dataset: dict, **extra) -> "Bundle":
        """A new bundle manifest (not yet saved) for ``teacher`` and ``dataset``."""
        manifest = {"format": FORMAT, "version": VERSION, "name": validate_name(name, "bundle name"),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "teacher": teacher, "dataset": dataset, "clts": {}, **extra}
        return cls(root, manifest)

    @staticmethod
    def exists(root: str | Path) -> bool:
        """Whether ``root`` is a bundle folder (it has a manifest)."""
        return (Path(root) / MANIFEST).is_file()

    @classmethod
    def load(cls, root: str | Path) -> "Bundle":
        """Read and validate ``root/bundle.json``."""
        root = Path(root)
        if not root.is_dir():
            raise AssetError(f"{root}: bundle folder does not exist")
        return cls(root, read_json(root / MANIFEST))

    def save(self) -> None:
        """Validate and write bundle.json atomically."""
        self.validate()
        write_json(self.root / MANIFEST, self.manifest)

    def validate(self) -> None:
        """Raise :class:`AssetError` naming bundle.json and the problem when the manifest is malformed."""
        where = str(self.root / MANIFEST)
        m = self.manifest
        check_keys(m, _TOP_KEYS, _OPTIONAL_KEYS, where)
        if m["format"] != FORMAT or m["version"] != VERSION:
            raise AssetError(f"{where}: format {m['format']!r} version {m['version']!r} is not "
                             f"{FORMAT!r} version {VERSION}")
        validate_name(m["name"], "bundle name")
        check_keys(m["teacher"], _TEACHER_KEYS, _TEACHER_OPTIONAL, f"{where} [teacher]")
        check_keys(m["dataset"], _DATASET_KEYS, _DATASET_OPTIONAL, f"{where} [dataset]")
        classnames, templates = m["dataset"]["classnames"], m["dataset"]["templates"]
        if not (isinstance(classnames, list) and classnames and all(isinstance(c, str) for c in classnames)):
            raise AssetError(f"{where}: dataset.classnames must be a non-empty list of strings")
        if not (isinstance(templates, list) and templates and all(isinstance(t, str) and t.count("{}") == 1
                                                                  for t in templates)):
            raise AssetError(f"{where}: dataset.templates must be strings with one '{{}}' placeholder each")
        if not isinstance(m["clts"], dict):
            raise AssetError(f"{where}: clts must map CLT names to folders")
        for name, folder in m["clts"].items():
            validate_name(name, "CLT name")
            inside(self.root, folder, f"{where} [clts.{name}]")
        model = m["teacher"]["model"]
        if model.startswith(LOCAL_DIR):
            inside(self.root, model[len(LOCAL_DIR):], f"{where} [teacher.model]")

    # ---- contents ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def classnames(self) -> list[str]:
        return self.manifest["dataset"]["classnames"]

    @property
    def templates(self) -> list[str]:
        return self.manifest["dataset"]["templates"]

    @property
    def clt_names(self) -> list[str]:
        return list(self.manifest["clts"])

    def path(self, relative: str, where: str = "bundle") -> Path:
        """A path inside the bundle."""
        return inside(self.root, relative, f"{self.root / MANIFEST} [{where}]")

    def _registered(self, key: str, default: str) -> Path:
        """The folder or file the manifest registers under ``key``, else where the layout puts it."""
        return self.path(self.manifest.get(key, default), key)

    # ---- the layout: every path of the bundle --------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def teacher_dir(self) -> Path:
        """Where a teacher that lives inside the bundle (``local-dir:teacher``) is stored."""
        return self.root / TEACHER_DIR

    def clt_dir(self, name: str) -> Path:
        """The folder of CLT ``name``: the registered one, else where :meth:`add_clt` will register it."""
        if name in self.manifest["clts"]:
            return self.path(self.manifest["clts"][name], f"clts.{name}")
        return self.root / CLTS_DIR / validate_name(name, "CLT name")

    def clt_weights_path(self, name: str) -> Path:
        return self.clt_dir(name) / WEIGHTS_FILE

    def training_log_path(self, name: str) -> Path:
        return self.clt_dir(name) / LOG_FILE

    def evaluation_path(self, name: str) -> Path:
        return evaluation_file(self.clt_dir(name))

    def layer_terms_path(self, name: str) -> Path:
        return layer_terms_file(self.clt_dir(name))

    def retrieval_dir(self, name: str) -> Path:
        return self.clt_dir(name) / RETRIEVAL_DIR

    def features_dir(self, name: str) -> Path:
        return self.clt_dir(name) / FEATURES_DIR

    @property
    def thumbnails_dir(self) -> Path:
        return self._registered("thumbnails", THUMBNAILS_DIR)

    @property
    def examples_dir(self) -> Path:
        return self._registered("examples", EXAMPLES_DIR)

    @property
    def zeroshot_file(self) -> Path:
        return self._registered("zeroshot", ZEROSHOT_FILE)

    @property
    def report_dir(self) -> Path:
        """Where the bundle's report is written (its page, tables and figures)."""
        return self.root / REPORT_DIR

    @property
    def report_path(self) -> Path:
        return self.report_dir / REPORT_FILE

    # ---- what the bundle holds -----------------------------------------------------------------

    @property
    def has_thumbnails(self) -> bool:
        return "thumbnails" in self.manifest

    @property
    def has_examples(self) -> bool:
        return "examples" in self.manifest

    def zeroshot_path(self) -> Path | None:
        """The cached zero-shot text embeddings, when the bundle has them."""
        return self.zeroshot_file if "zeroshot" in self.manifest else None

    def examples(self) -> list[Path]:
        """The bundle's example images (none when it has no examples)."""
        return sorted(self.examples_dir.glob("*.png")) if self.has_examples else []

    def evaluation(self, name: str) -> dict | None:
        """The evaluation results of CLT ``name``, when it has been evaluated."""
        path = self.evaluation_path(name)
        return read_json(path) if path.is_file() else None

    def training_log(self, name: str) -> list[dict]:
        """The training log of CLT ``name``, one record per logged step (empty when it has none)."""
        path = self.training_log_path(name)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def layer_terms(self, name: str) -> dict | None:
        """The layer-term experiment's results of CLT ``name``, when it has been run."""
        path = self.layer_terms_path(name)
        return read_json(path) if path.is_file() else None

    # ---- typed updates of the manifest (each one saved at once) ------------------------------------

    def add_clt(self, name: str) -> Path:
        """Register CLT ``name`` at its folder (``clts/<name>``) and return that folder."""
        folder = self.clt_dir(name)
        self.manifest["clts"][validate_name(name, "CLT name")] = folder.relative_to(self.root).as_posix()
        self.save()
        return folder

    def set_thumbnails(self) -> None:
        """Record that :attr:`thumbnails_dir` holds the thumbnails of the indexed training images."""
        self._register("thumbnails", THUMBNAILS_DIR)

    def set_examples(self) -> None:
        """Record that :attr:`examples_dir` holds example images."""
        self._register("examples", EXAMPLES_DIR)

    def set_zeroshot(self) -> None:
        """Record that :attr:`zeroshot_file` holds the cached zero-shot classifier."""
        self._register("zeroshot", ZEROSHOT_FILE)

    def set_settings(self, settings: dict) -> None:
        """The settings the bundle was built with (shown in the app and the model card)."""
        self.manifest["settings"] = settings
        self.save()

    def set_evaluation_summary(self, summary: dict[str, dict]) -> None:
        """The headline figures of each evaluated CLT (one entry per CLT name)."""
        self.manifest["evaluation"] = summary
        self.save()

    def _register(self, key: str, default: str) -> None:
        self.manifest.setdefault(key, default)
        self.save()

    @property
    def teacher_description(self) -> str:
        """What the teacher is, in words ("tiny CLIP trained on synthetic shapes", "ViT-B/32 (OpenAI)")."""
        teacher = self.manifest["teacher"]
        if teacher.get("description"):
            return teacher["description"]
        model, pretrained = teacher["model"], teacher.get("pretrained")
        return f"{model} ({Path(pretrained).name if '/' in pretrained else pretrained})" if pretrained else model

    def teacher_model_name(self) -> str:
        """The open_clip model name, with a bundle-relative ``local-dir:`` resolved to an absolute path."""
        model = self.manifest["teacher"]["model"]
        if model.startswith(LOCAL_DIR):
            return LOCAL_DIR + str(self.path(model[len(LOCAL_DIR):], "teacher.model"))
        return model

    def load_teacher(self, device: str | torch.device = "cpu") -> Teacher:
        return Teacher.load(self.teacher_model_name(), self.manifest["teacher"].get("pretrained"), device=device)

    def clt_config(self, name: str) -> CLTConfig:
        """The config of CLT ``name`` (without loading its weights)."""
        path = self.clt_dir(name) / CONFIG_FILE
        return CLTConfig.from_dict(read_json(path), str(path))

    def load_clt(self, name: str, teacher: Teacher | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> CrossLayerTranscoder:
        """Load CLT ``name`` (weights cast to ``dtype``, thresholds kept fp32), refusing one trained on another
        teacher than ``teacher``."""
        folder = self.clt_dir(name)
        clt = CrossLayerTranscoder.from_pretrained(folder, device=device, dtype=dtype)
        return clt if teacher is None else self.check_clt(clt, teacher, folder)

    def load_classifier(self, teacher: Teacher) -> ZeroShotClassifier:
        """The zero-shot classifier over the bundle's classes (from its cache when it fits the teacher and names)."""
        return ZeroShotClassifier.load_or_build(teacher, self.classnames, self.templates, self.zeroshot_path())

    def load_thumbnails(self) -> ThumbnailStore | None:
        """The thumbnails of the indexed training images (None when the bundle has none)."""
        return ThumbnailStore(self.thumbnails_dir) if self.has_thumbnails else None

    def load_index(self, name: str, n_images: int) -> RetrievalIndex | None:
        """The retrieval indexes of CLT ``name`` checked against its config and the ``n_images`` thumbnails
        (None while it has none)."""
        if not RetrievalIndex.exists(self.retrieval_dir(name)):
            return None
        config = self.clt_config(name)
        return RetrievalIndex.load(self.retrieval_dir(name), config.n_layers, config.n_features, n_images)

    def load_feature_store(self, name: str, n_images: int) -> FeatureStore | None:
        """The feature statistics of CLT ``name`` over the ``n_images`` indexed images (None while it has none)."""
        if not FeatureStore.exists(self.features_dir(name)):
            return None
        config = self.clt_config(name)
        return FeatureStore(self.features_dir(name), config.n_layers, config.n_features, n_images)

    @staticmethod
    def check_clt(clt: CrossLayerTranscoder, teacher: Teacher, folder: Path) -> CrossLayerTranscoder:
        """Refuse a CLT trained on another teacher, or shaped for another one."""
        c = clt.config
        if c.teacher and c.teacher != teacher.identity:
            raise AssetError(f"{folder / CONFIG_FILE}: CLT was trained on teacher {c.teacher!r}, "
                             f"but the bundle's teacher is {teacher.identity!r}")
        if (c.n_layers, c.d_model) != (teacher.n_layers, teacher.d_model):
            raise AssetError(f"{folder / CONFIG_FILE}: CLT shape {c.n_layers} layers x {c.d_model} does not "
                             f"match the teacher's {teacher.n_layers} x {teacher.d_model}")
        return clt


def open_bundle(spec: str | Path, revision: str | None = None, cache_dir: str | None = None) -> Bundle:
    """A bundle from a folder, or from ``hf://owner/repo`` through huggingface_hub (cached)."""
    spec = str(spec)
    if spec.startswith(HF_PREFIX):
        repo_id = validate_repo_id(spec[len(HF_PREFIX):])
        return Bundle.load(download_snapshot(repo_id, revision, cache_dir))
    return Bundle.load(spec)
