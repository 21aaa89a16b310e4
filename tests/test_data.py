import json

import pytest
from PIL import Image

from clt_explorer.data import DatasetMissing, load_dataset
from clt_explorer.data.imagenet100 import imagenet100_classnames
from clt_explorer.data.resources import cifar100_classnames, cifar_templates, imagenet100_wnids
from clt_explorer.data.synthetic import SyntheticShapes


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = SyntheticShapes("train", 10, seed=3), SyntheticShapes("train", 10, seed=3)
    assert a[4][0].tobytes() == b[4][0].tobytes() and a[4][1] == 4
    test = SyntheticShapes("test", 10, seed=3)
    assert a[4][0].tobytes() != test[4][0].tobytes()
    assert len(SyntheticShapes.classnames) == 100 and a[4][0].size == (64, 64)
    with pytest.raises(IndexError):
        a[10]


def test_resources():
    assert len(cifar100_classnames()) == 100 and cifar100_classnames()[1] == "aquarium fish"
    assert len(cifar_templates()) == 18 and all("{}" in t for t in cifar_templates())
    names = imagenet100_classnames()
    assert len(names) == 100 and len(set(names)) == 100


def test_cifar100_missing_offline_names_the_folder(tmp_path):
    with pytest.raises(DatasetMissing, match=str(tmp_path / "cifar-100-python")):
        load_dataset("cifar100", "test", root=str(tmp_path), download=False)


def test_cifar100_files_that_are_not_the_official_ones_are_refused_unread(tmp_path):
    """A file set in torchvision's layout cannot be written locally: torchvision checks each file's MD5 against the
    official archive before it unpickles anything. Files of the right names but other bytes (not even pickles, so
    an attempt to read them would fail otherwise) are refused with a message that says so."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not the official CIFAR-100 batch")
    with pytest.raises(DatasetMissing, match=f"files under {folder} do not pass torchvision's MD5 check"):
        load_dataset("cifar100", "test", root=str(tmp_path), download=False)


def test_imagenet100_from_a_local_folder(tmp_path):
    wnids = imagenet100_wnids()
    for wnid in wnids:
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / "val" / wnid / f"{wnid}_1.JPEG")
    data = load_dataset("imagenet100", "val", root=str(tmp_path))
    assert len(data) == 100 and data.labels == list(range(100))
    assert data.classnames == imagenet100_classnames() and len(data.templates) == 80
    image, label = data[7]
    assert image.size == (8, 8) and label == 7
    (tmp_path / "val" / wnids[5] / f"{wnids[5]}_1.JPEG").unlink()
    (tmp_path / "val" / wnids[5]).rmdir()
    with pytest.raises(DatasetMissing, match="1 are missing"):
        load_dataset("imagenet100", "val", root=str(tmp_path))


def test_coco_label_is_the_category_with_the_largest_area(tmp_path):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    for i in (1, 2, 3):
        Image.new("RGB", (10, 10)).save(tmp_path / "val2017" / f"{i:012d}.jpg")
    annotations = {
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)],
        "annotations": [
            {"image_id": 1, "category_id": 1, "area": 50.0}, {"image_id": 1, "category_id": 18, "area": 30.0},
            {"image_id": 1, "category_id": 18, "area": 30.0},  # two dogs outweigh one person
            {"image_id": 2, "category_id": 3, "area": 5.0},  # image 3 has no annotation: left out
        ],
    }
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(annotations))
    data = load_dataset("coco", "val2017", root=str(tmp_path))
    assert data.classnames == ["person", "car", "dog"]
    assert data.labels == [2, 1] and len(data) == 2
    with pytest.raises(DatasetMissing, match="instances_train2017.json"):
        load_dataset("coco", "train2017", root=str(tmp_path))


def test_image_folder_and_bad_options(tmp_path):
    for name in ("red_apple", "green_pear"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (5, 5)).save(tmp_path / "train" / name / "a.png")
    data = load_dataset("folder", "train", root=str(tmp_path))
    assert data.classnames == ["green pear", "red apple"] and data.labels == [0, 1]
    with pytest.raises(DatasetMissing, match="test"):
        load_dataset("folder", "test", root=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="bad options"):
        load_dataset("synthetic", "train", colour="blue")
