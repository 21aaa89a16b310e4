import json
import shutil

import pytest
import torch
from PIL import Image

from clt_explorer.data import DatasetMissing, grouped_image_batches, load_dataset, loader_workers
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


def test_grouped_batches_keep_each_groups_images_apart_and_in_order():
    data = SyntheticShapes("train", n_images=30, image_size=16, seed=1)
    groups = [[4, 9, 2, 7, 11], [0, 3], [20, 21, 22, 23, 24, 25, 26]]
    batches = list(grouped_image_batches(data, lambda image: torch.zeros(1), 3, groups, num_workers=2))
    assert [batch[2].tolist() for batch in batches] == [[4, 9, 2], [7, 11], [0, 3], [20, 21, 22], [23, 24, 25], [26]]
    assert [batch[1].tolist() for batch in batches][0] == [data[i][1] for i in (4, 9, 2)]


@pytest.mark.parametrize("device, pinned", [(None, False), ("cpu", False), (torch.device("cuda", 0), True)])
def test_batches_for_a_cuda_device_come_pinned(device, pinned):
    """Pinned batches copy to a GPU without waiting for its queued work (Teacher.on_device copies non-blocking)."""
    data = SyntheticShapes("train", n_images=4, image_size=16)
    assert grouped_image_batches(data, lambda image: torch.zeros(1), 2, [range(4)], device=device).pin_memory is pinned


def test_loader_workers_leave_a_gpu_feeder_core_and_split_the_cores_between_ranks(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr("os.path.isdir", lambda path: False)  # no /dev/shm to bound them (this machine's may be small)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    batch = 64 * 3 * 224 * 224 * 4
    assert loader_workers(torch.device("cpu"), batch) == 0  # the cores compute
    assert loader_workers(torch.device("cuda"), batch) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers(torch.device("cuda", 1), batch) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert loader_workers(torch.device("cuda"), batch) == 0
    assert loader_workers("cuda", batch, requested=5) == loader_workers("cpu", batch, requested=5) == 5  # a user's


@pytest.mark.parametrize("free_mb, workers", [(64, 0), (1000, 6), (100_000, 15)])
def test_loader_workers_fit_in_half_the_free_shared_memory(monkeypatch, free_mb, workers):
    """Each worker keeps two batches ready in /dev/shm; a container's default 64 MB holds none of 38.5 MB."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.path.isdir", lambda path: path == "/dev/shm")
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, free_mb * 10**6))
    batch = 64 * 3 * 224 * 224 * 4
    if workers < 15:
        with pytest.warns(UserWarning, match=f"/dev/shm has {free_mb} MB free, room for {workers} image-loading "
                                             "workers of the 15 .* --shm-size"):
            assert loader_workers(torch.device("cuda"), batch) == workers
    else:
        assert loader_workers(torch.device("cuda"), batch) == workers
