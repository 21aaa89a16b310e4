"""The weights shipped with the package: what the demo preset asks for, as good as trained, and copied by the
pipeline only where a job asks for exactly their recipe."""

import dataclasses
import filecmp

import pytest
import torch

from clt_explorer.assets.bundle import Bundle
from clt_explorer.assets.pipeline import build_bundles, preset_jobs
from clt_explorer.assets.shipped import (
    CLT_FILES,
    SHIPPED_DIR,
    TEACHER_DIR,
    shipped_accuracy,
    shipped_clt,
    shipped_teacher,
)
from clt_explorer.data import load_dataset
from clt_explorer.model.clt import CrossLayerTranscoder
from clt_explorer.model.teacher import LOCAL_DIR, OPEN_CLIP_FILES, Teacher
from clt_explorer.model.zeroshot import zero_shot_accuracy

REGENERATE = "the demo preset changed: run python -m clt_explorer.assets.shipped"
SPARSIFIERS = preset_jobs("demo")[0].sparsifiers
FIRST = SPARSIFIERS[0]


@pytest.fixture(scope="module")
def teacher():
    return Teacher.load(LOCAL_DIR + str(SHIPPED_DIR / TEACHER_DIR))


def test_the_shipped_weights_are_the_demo_presets(teacher):
    job = preset_jobs("demo")[0]
    assert shipped_teacher(job) == SHIPPED_DIR / TEACHER_DIR, REGENERATE
    for name in SPARSIFIERS:
        assert shipped_clt(job, name, teacher) == SHIPPED_DIR / name, REGENERATE


@pytest.mark.parametrize("change", [{"tiny_clip_steps": 100}, {"seed": 1}, {"k": 16}, {"expansion": 4},
                                    {"train_images": 5000}, {"shipped_weights": False},
                                    {"dataset_options": {"n_train": 500, "n_test": 2000, "image_size": 64}},
                                    {"train": "lr"}])
def test_any_other_recipe_trains_instead(teacher, change):
    job = preset_jobs("demo")[0]
    if change == {"train": "lr"}:
        change = {"train": dataclasses.replace(job.train, lr=1e-3)}
    changed = dataclasses.replace(job, **change)
    teacher_changes = {"tiny_clip_steps", "seed", "shipped_weights"}
    assert (shipped_teacher(changed) is None) == bool(teacher_changes & set(change))
    assert all(shipped_clt(changed, name, teacher) is None for name in SPARSIFIERS)


def test_the_shipped_clt_belongs_to_another_teacher_only_by_its_recipe(random_teacher):
    assert shipped_clt(preset_jobs("demo")[0], FIRST, random_teacher) is None


def test_the_shipped_teacher_classifies_as_recorded(teacher):
    job = preset_jobs("demo")[0]
    test = load_dataset("synthetic", "test", **job.dataset_options)
    accuracy = zero_shot_accuracy(teacher, test, 4 * job.batch_size, progress=False)  # as when made
    assert accuracy > 0.8 and accuracy == pytest.approx(shipped_accuracy(), abs=1e-6)


@pytest.mark.parametrize("name", SPARSIFIERS)
def test_the_shipped_clts_reconstruct_held_out_images(teacher, name):
    test = load_dataset("synthetic", "test", **preset_jobs("demo")[0].dataset_options)
    clt = CrossLayerTranscoder.from_pretrained(SHIPPED_DIR / name)
    assert clt.config.teacher == teacher.identity
    with torch.no_grad():
        capture = teacher.capture(teacher.preprocess_images([test[i][0] for i in range(64)]))
        yhat = clt.decode(clt.encode_sparse(capture.xs))
    residual = (capture.ys - yhat).pow(2).sum((1, 2, 3))
    total = (capture.ys - capture.ys.mean((1, 2), keepdim=True)).pow(2).sum((1, 2, 3))
    assert (1 - residual / total).min() > 0.7  # R^2 of every layer on held-out images


@pytest.mark.slow
def test_the_pipeline_copies_the_shipped_weights_for_the_demo_recipe(tmp_path):
    job = dataclasses.replace(preset_jobs("demo")[0], sparsifiers=(FIRST,), retrieval_images=300,
                              eval_images=100, batch_size=100)
    reports = {r.step: r for r in build_bundles([job], tmp_path, torch.device("cpu"), progress=False)}
    assert not [r for r in reports.values() if r.status == "failed"], reports
    assert reports["teacher"].detail.startswith("copied the shipped tiny CLIP")
    assert reports[f"train {FIRST}"].detail.startswith("copied the shipped CLT")
    bundle = Bundle.load(tmp_path / job.name)
    assert bundle.clt_names == [FIRST]
    assert all(filecmp.cmp(SHIPPED_DIR / TEACHER_DIR / name, bundle.teacher_dir / name, shallow=False)
               for name in OPEN_CLIP_FILES)
    assert all(filecmp.cmp(SHIPPED_DIR / FIRST / name, bundle.clt_dir(FIRST) / name, shallow=False)
               for name in CLT_FILES)
