"""The asset bundle: a folder (or a Hub repo with the same files) that the app and the scripts read.

    bundle.json                      manifest (below)
    teacher/                         open_clip folder of a local teacher (config + safetensors), if any
    clts/<sparsifier>/               config.json + model.safetensors (+ training.json, train_log.jsonl)
    clts/<sparsifier>/evaluation/    evaluation results
    clts/<sparsifier>/retrieval/     per-layer retrieval indexes
    thumbnails/                      training-image thumbnails
    examples/                        a few test images for the app
    zeroshot.safetensors             cached class text embeddings (saves the app minutes at start-up)

bundle.json names the teacher (open_clip architecture + pretrained tag, or ``local-dir:teacher``
relative to the bundle), the dataset (adapter name, options, class names, templates) and, per
sparsifier, the folder of its CLT. Every relative path must stay inside the bundle.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import torch

from .clt import CONFIG_FILE, CLTConfig, CrossLayerTranscoder
from .storage import AssetError, check_keys, download_snapshot, is_repo_id, read_json, write_json
from .teacher import LOCAL_DIR, Teacher

MANIFEST = "bundle.json"
FORMAT = "clt-explorer-bundle"
VERSION = 1
HF_PREFIX = "hf://"
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")

_TOP_KEYS = {"format", "version", "name", "teacher", "dataset", "clts"}
_OPTIONAL_KEYS = {"created", "description", "thumbnails", "examples", "zeroshot", "evaluation", "settings"}
_TEACHER_KEYS = {"model"}
_TEACHER_OPTIONAL = {"pretrained", "identity"}
_DATASET_KEYS = {"name", "classnames", "templates"}
_DATASET_OPTIONAL = {"options", "train_split", "test_split", "label_rule"}


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
        self.root = Path(root)
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
            raise AssetError(f"{where}: clts must map sparsifier names to folders")
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

    def clt_dir(self, name: str) -> Path:
        if name not in self.manifest["clts"]:
            raise KeyError(f"bundle {self.name!r} has no CLT {name!r}; it has {self.clt_names}")
        return self.path(self.manifest["clts"][name], f"clts.{name}")

    def add_clt(self, name: str, folder: str | None = None) -> Path:
        """Register (and return) the folder of CLT ``name``; call :meth:`save` to persist."""
        self.manifest["clts"][validate_name(name, "CLT name")] = folder or f"clts/{name}"
        return self.clt_dir(name)

    def zeroshot_path(self) -> Path | None:
        """The cached zero-shot text embeddings, when the bundle has them."""
        return self.path(self.manifest["zeroshot"], "zeroshot") if "zeroshot" in self.manifest else None

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
        """Load CLT ``name``, refusing one trained on another teacher than ``teacher``."""
        folder = self.clt_dir(name)
        clt = CrossLayerTranscoder.from_pretrained(folder, device=device, dtype=dtype)
        return clt if teacher is None else self.check_clt(clt, teacher, folder)

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
