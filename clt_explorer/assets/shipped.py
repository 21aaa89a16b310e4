"""Weights shipped with the package, so that the offline default bundle's first start trains nothing: the tiny CLIP
(3.8 MB, see below) and the demo's three CLTs (float32, 1.8 MB each, with their training logs), each beside the recipe
it was trained with. The pipeline copies them into a bundle whose job asks for exactly that recipe (the offline default
and ``train_all.py --preset demo`` do), and trains as before for any other.

They are made by this module, with the demo preset's settings, in about three minutes on 2 CPU cores:

    python -m clt_explorer.assets.shipped [--out FOLDER]

The teacher is stored rounded: its text tower's vocabulary table (49,408 x 64, 90% of its weights, of which the
class names use a few dozen rows) in float8 (e4m3), everything else in float16; open_clip loads it as any other
folder. It is the one the shipped CLTs were trained on and evaluated with: a bundle built from the shipped files is a
bundle built from scratch with that rounded teacher (its zero-shot accuracy is recorded here: 86.75% against 86.8% in
float32).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..data import load_dataset, split_name
from ..model.clt import CONFIG_FILE, WEIGHTS_FILE, CLTConfig
from ..model.teacher import LOCAL_DIR, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, Teacher
from ..model.zeroshot import zero_shot_accuracy
from ..storage import atomic_path, load_tensors, read_json, save_tensors, write_json
from ..training.outputs import LOG_FILE, SETTINGS_FILE, SUMMARY_FILE
from ..training.tiny_clip import train_tiny_clip
from ..training.train import train_clt

SHIPPED_DIR = Path(__file__).parent / "resources" / "demo"
RECIPES_FILE = "recipes.json"
TEACHER_DIR = "teacher"
VOCABULARY_TABLE = "token_embedding.weight"  # stored in float8: 3.8 MB in all instead of 7.0 in float16
CLT_FILES = (CONFIG_FILE, WEIGHTS_FILE, SETTINGS_FILE, LOG_FILE, SUMMARY_FILE)  # the summary, last, marks it trained


def teacher_recipe(job) -> dict:
    """What the tiny CLIP of a :class:`BundleJob` depends on."""
    return {"backbone": job.backbone, "tiny_clip_steps": job.tiny_clip_steps, "seed": job.seed}


def clt_recipe(job, name: str) -> dict:
    """What CLT ``name`` of a :class:`BundleJob` depends on (its teacher's recipe included)."""
    return {**teacher_recipe(job), "dataset": job.dataset, "dataset_options": job.dataset_options,
            "train_images": job.train_images, "sparsifier": name, "expansion": job.expansion, "k": job.k,
            "train": job.train.to_dict()}


def _recipes(folder: Path) -> dict:
    path = folder / RECIPES_FILE
    return read_json(path) if path.is_file() else {}


def _same(recipe: dict, shipped: dict | None) -> bool:
    """Whether a recipe is the shipped one (compared as JSON, where tuples are lists)."""
    return shipped is not None and json.loads(json.dumps(recipe)) == shipped


def shipped_teacher(job, folder: Path = SHIPPED_DIR) -> Path | None:
    """The shipped tiny CLIP's open_clip folder when ``job`` asks for exactly it, else None."""
    if not job.shipped_weights or not _same(teacher_recipe(job), _recipes(folder).get("teacher")):
        return None
    return folder / TEACHER_DIR


def shipped_clt(job, name: str, teacher: Teacher, folder: Path = SHIPPED_DIR) -> Path | None:
    """The shipped CLT ``name`` when ``job`` asks for exactly it and ``teacher`` is the one it was trained on."""
    if not job.shipped_weights or not _same(clt_recipe(job, name), _recipes(folder).get("clts", {}).get(name)):
        return None
    clt_folder = folder / name
    config = CLTConfig.from_dict(read_json(clt_folder / CONFIG_FILE), str(clt_folder / CONFIG_FILE))
    return clt_folder if config.teacher == teacher.identity else None


def shipped_accuracy(folder: Path = SHIPPED_DIR) -> float:
    """The shipped tiny CLIP's zero-shot top-1 on the synthetic test split, measured when it was made."""
    return _recipes(folder)["teacher_accuracy"]


def copy_files(source: Path, target: Path, names) -> None:
    """Copy the files ``names`` from ``source`` to ``target`` in that order, each atomically (the last one marks the
    copy complete for whoever checks it)."""
    for name in names:
        with atomic_path(target / name) as tmp:
            shutil.copyfile(source / name, tmp)


def write_shipped(out: Path = SHIPPED_DIR, progress: bool = True) -> dict:
    """Train the tiny CLIP and the CLTs with the demo preset's settings, write them and their recipes to ``out``."""
    from .pipeline import preset_jobs  # the pipeline reads this module

    job = preset_jobs("demo")[0]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        train_tiny_clip(work, steps=job.tiny_clip_steps, seed=job.seed, progress=progress)
        rounded = {name: t.to(torch.float8_e4m3fn if name == VOCABULARY_TABLE else torch.float16)
                   if t.is_floating_point() else t for name, t in load_tensors(Path(work) / OPEN_CLIP_WEIGHTS).items()}
        save_tensors(out / TEACHER_DIR / OPEN_CLIP_WEIGHTS, rounded)
        shutil.copyfile(Path(work) / OPEN_CLIP_CONFIG, out / TEACHER_DIR / OPEN_CLIP_CONFIG)
    teacher = Teacher.load(LOCAL_DIR + str((out / TEACHER_DIR).resolve()))
    test, train = (load_dataset(job.dataset, split_name(job.dataset, which), **job.dataset_options)
                   for which in ("test", "train"))
    accuracy = zero_shot_accuracy(teacher, test, 4 * job.batch_size, progress)
    for name in job.sparsifiers:
        shutil.rmtree(out / name, ignore_errors=True)
        config = CLTConfig(teacher.n_layers, teacher.d_model, job.expansion, name, job.k)
        train_clt(teacher, train, config, job.train, out / name, progress)
    recipes = {"teacher": teacher_recipe(job), "teacher_accuracy": accuracy,
               "clts": {name: clt_recipe(job, name) for name in job.sparsifiers}}
    write_json(out / RECIPES_FILE, json.loads(json.dumps(recipes)))
    return recipes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SHIPPED_DIR), help="where the files go (default: the package's own)")
    args = parser.parse_args(argv)
    recipes = write_shipped(Path(args.out))
    sizes = {path.relative_to(args.out): path.stat().st_size for path in Path(args.out).rglob("*") if path.is_file()}
    for path, size in sizes.items():
        print(f"{size / 1e6:8.2f} MB  {path}")
    print(f"zero-shot top-1 of the rounded tiny CLIP: {100 * recipes['teacher_accuracy']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
