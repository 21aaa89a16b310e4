"""Rehearse the ``paper`` preset end to end at its true shape, without downloads, and measure every stage.

The teacher is a ViT-B/32-shaped open_clip model with random weights, saved as a local safetensors folder and
loaded through the normal ``local-dir:`` path; the data is an image folder of generated shapes (100 classes: 10
colours x 10 shapes), 50,000 training and 10,000 test images. Then the pipeline runs as
``scripts/train_all.py --preset paper`` runs it: the three CLTs (expansion 16, k 128, 10 epochs; each training stage
captures the teacher's activations as it streams them), retrieval indexes, feature statistics, thumbnails,
evaluation tables, layer terms and the report. The first row is the rehearsal's own inputs. Each stage's wall time,
peak GPU memory (``torch.cuda.max_memory_allocated``, reset per stage), peak host memory (this process's VmHWM,
reset per stage through /proc/self/clear_refs) and the bytes it wrote to the bundle are printed as a table, then one
JSON line; each stage's row is also printed as that stage ends (``stage {json}``), so that a run stopped early keeps
the stages it finished.

``--scale`` shrinks the image counts and the epochs for a CPU run, or for a GPU lent for less time than the whole run
takes; ``--shape tiny`` swaps the ViT-B/32 shape for the offline tiny CLIP's (4 layers, width 64), which the tests use.
A scaled run also projects each stage's time to the true scale, linearly in the work that grows (see
:func:`work_ratio`): an upper estimate, since fixed costs (loading, the first batches) are multiplied too.

Under ``torchrun --nproc-per-node N`` rank 0 writes the teacher and the images, the ranks share the CLT training (DDP)
and rank 0 does the rest, as in train_all.py.

    python scripts/rehearse_paper.py --work /scratch/rehearsal                  # true shape (a GPU box)
    python scripts/rehearse_paper.py --work /tmp/r --scale 0.002 --shape tiny   # seconds on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import open_clip
import torch
from tqdm import tqdm

from clt_explorer.assets.pipeline import build_bundles, preset_jobs
from clt_explorer.data.synthetic import SyntheticShapes
from clt_explorer.model.teacher import LOCAL_DIR, OPEN_CLIP_CONFIG
from clt_explorer.storage import write_bytes
from clt_explorer.training.tiny_clip import PREPROCESS_CONFIG, TINY_CLIP_CONFIG, save_open_clip_folder
from clt_explorer.training.train import default_device, init_distributed

ARCH = "ViT-B-32-quickgelu"
TRAIN_IMAGES, TEST_IMAGES, EPOCHS = 50_000, 10_000, 10
IMAGE_SIZE = 64  # generated images; the teacher's preprocessing resizes them
READY = "ready"  # rank 0 marks the generated inputs complete with this file


def teacher_config(shape: str) -> tuple[dict, dict]:
    """(open_clip model config, preprocess config) of the rehearsal's teacher."""
    if shape == "tiny":
        return copy.deepcopy(TINY_CLIP_CONFIG), dict(PREPROCESS_CONFIG)
    preprocess = {"size": 224, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    return open_clip.get_model_config(ARCH), preprocess


def write_inputs(work: Path, shape: str, n_train: int, n_test: int) -> tuple[Path, Path]:
    """The teacher folder and the image folder (``train/`` and ``test/`` with a sub-folder per class), written once
    (a rerun with the same work folder and sizes reuses them)."""
    teacher, data = work / "teacher", work / "data"
    if (work / READY).is_file() and json.loads((work / READY).read_text()) == [shape, n_train, n_test]:
        return teacher, data
    torch.manual_seed(0)
    model_cfg, preprocess = teacher_config(shape)
    save_open_clip_folder(open_clip.CLIP(**model_cfg), model_cfg, preprocess, teacher)
    for split, count in (("train", n_train), ("test", n_test)):
        write_images(data / split, split, count)
    write_bytes(work / READY, json.dumps([shape, n_train, n_test]).encode())
    return teacher, data


def write_images(folder: Path, split: str, count: int) -> None:
    """``count`` generated shapes of ``split`` as PNG files in ``folder/<class>/`` (100 classes)."""
    images = SyntheticShapes(split, count, IMAGE_SIZE, seed=0)
    for i in tqdm(range(count), desc=f"writing {split} images", mininterval=2):
        image, label = images[i]
        target = folder / images.classnames[label].replace(" ", "_")
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{i:06d}.png")


def work_ratio(stage: str, n_train: int, n_test: int, epochs: int) -> float:
    """How many times this run's work a stage has at the true scale: training grows with the images times the epochs;
    the passes over the training images (indexes, feature statistics, thumbnails) with those, evaluation and layer
    terms with the test images, writing the inputs with both; the rest (the teacher, the classifier, the examples,
    the report) does not grow."""
    kind = stage.split()[0]
    if kind == "train":
        return TRAIN_IMAGES * EPOCHS / (n_train * epochs)
    if kind in ("retrieval", "features", "thumbnails"):
        return TRAIN_IMAGES / n_train
    if kind in ("evaluate", "layer"):
        return TEST_IMAGES / n_test
    if kind == "inputs":
        return (TRAIN_IMAGES + TEST_IMAGES) / (n_train + n_test)
    return 1.0


def wait_for_inputs(work: Path, timeout_s: float = 3600) -> None:
    """Ranks other than 0 wait until rank 0 has written the inputs."""
    began = time.time()
    while not (work / READY).is_file():
        if time.time() - began > timeout_s:
            raise TimeoutError(f"rank 0 did not write the rehearsal's inputs under {work} in {timeout_s:.0f} s")
        time.sleep(2)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def reset_host_peak() -> bool:
    """Reset this process's VmHWM to its current resident size (Linux 4.0+); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def host_peak_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


STAGE_LINE = "stage "  # a stage's row is printed as it ends: a run stopped before its table keeps those done


class StageMeter:
    """Told by the pipeline when each step starts and ends (the interface of its status writer): records each
    step's wall time, peak GPU and host memory, and the bytes it added to the bundle folder, and prints each row as
    ``stage {json}`` when the step ends."""

    def __init__(self, bundle_root: Path, echo: bool = True):
        self.root, self.rows, self._start, self.echo = bundle_root, [], None, echo
        self.peak_resets = True

    def started(self, step: str) -> None:
        self.peak_resets &= reset_host_peak()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._start = (step, time.time(), folder_bytes(self.root))

    def finished(self, report) -> None:
        step, began, before = self._start
        self.record({"stage": step, "status": report.status, "seconds": round(time.time() - began, 2),
                     "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)
                     if torch.cuda.is_available() else None,
                     "host_peak_gb": round(host_peak_gb(), 3),
                     "bytes_written": folder_bytes(self.root) - before, "detail": report.detail})

    def record(self, row: dict) -> None:
        self.rows.append(row)
        if self.echo:
            print(STAGE_LINE + json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the teacher, the images and the bundle")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="share of the 50,000 / 10,000 images (at least 100 each, one per class) and of the 10 "
                             "epochs (at least 1)")
    parser.add_argument("--shape", choices=["vit-b-32", "tiny"], default="vit-b-32", help="the teacher's shape")
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    rank, _ = init_distributed()
    work = Path(args.work).resolve()
    n_classes = len(SyntheticShapes.classnames)  # image i has class i mod 100: each split needs them all
    n_train, n_test = (max(n_classes, math.ceil(n * args.scale)) for n in (TRAIN_IMAGES, TEST_IMAGES))
    began = time.time()
    if rank == 0:
        teacher, data = write_inputs(work, args.shape, n_train, n_test)
    else:
        wait_for_inputs(work)
        teacher, data = work / "teacher", work / "data"
    inputs_s = time.time() - began
    epochs = max(1, round(EPOCHS * args.scale))
    [job] = preset_jobs("paper", datasets=["folder"], backbones=[LOCAL_DIR + str(teacher)], data_root=data,
                        train_overrides={"epochs": epochs})
    meter = StageMeter(work / "bundles" / job.name, echo=rank == 0)
    meter.record({"stage": "inputs (teacher, images)", "status": "built", "seconds": round(inputs_s, 2),
                  "gpu_peak_gb": None, "host_peak_gb": round(host_peak_gb(), 3),
                  "bytes_written": folder_bytes(teacher) + folder_bytes(data), "detail": str(work)})
    reports = build_bundles([job], work / "bundles", default_device(), progress=rank == 0, status=meter)
    if rank != 0:
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    for row in meter.rows:  # a stage skipped as already built (a rerun) does no more work at the true scale
        ratio = work_ratio(row["stage"], n_train, n_test, epochs) if row["status"] == "built" else 1.0
        row["projected_s"] = round(row["seconds"] * ratio, 1)
    print(f"\nThe paper preset at the {args.shape} shape, {n_train} training / {n_test} test images, {epochs} epochs, "
          f"on {device} (inputs written in {inputs_s:.0f} s):\n")
    print(f"{'stage':28} {'status':8} {'seconds':>9} {'GPU peak GB':>12} {'host peak GB':>13} {'MB written':>11} "
          f"{'s at true scale':>16}")
    for row in meter.rows:
        gpu = "-" if row["gpu_peak_gb"] is None else f"{row['gpu_peak_gb']:.2f}"
        print(f"{row['stage']:28} {row['status']:8} {row['seconds']:9.1f} {gpu:>12} {row['host_peak_gb']:13.2f} "
              f"{row['bytes_written'] / 1e6:11.1f} {row['projected_s']:16.0f}")
    projected = sum(row["projected_s"] for row in meter.rows)
    if args.scale < 1:
        print(f"s at true scale: each stage's seconds times the work it would have at scale 1 (an upper estimate); "
              f"{projected / 3600:.1f} h in all")
    if not meter.peak_resets:
        print("host peak: this kernel refused to reset VmHWM, so each stage shows the process's peak so far")
    failed = [r for r in reports if r.status == "failed"]
    print(json.dumps({"shape": args.shape, "scale": args.scale, "train_images": n_train, "test_images": n_test,
                      "epochs": epochs, "device": device, "inputs_s": round(inputs_s, 1),
                      "total_s": round(time.time() - began, 1), "projected_total_s": round(projected),
                      "bundle": str(meter.root),
                      "teacher_config": json.loads((teacher / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
                      .get("vision_cfg"), "stages": meter.rows, "failed": [r.step for r in failed]}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
