"""How many images a second the pipeline's loader prepares for a ViT-B/32 teacher, by number of worker processes.

Every pass over a dataset (training, retrieval indexes, feature statistics) decodes each image and resizes it to the
teacher's 224 pixels on the CPU. Training one CLT at 130k tokens/s reads 2,600 ViT-B/32 images a second (50 tokens
each), which one process cannot prepare: on a GPU the passes load in ``TrainConfig.loader_workers`` processes (by
default the CPU cores but one). This measures the loader alone (``grouped_image_batches``, batches of 64 in chunks of
256 images, as training reads them), each worker count over the same images: the seconds to the first batch (the
workers' start) and the images a second after it. With a GPU, every batch also lands there as in training: pinned by
the loader, copied without blocking. It prints a table and one JSON line.

    python scripts/bench_loading.py [--folder DATA/train] [--images 4000] [--workers 0,1,2,4]

Without ``--folder`` it writes ``--images`` generated 64-pixel PNG images (as the paper rehearsal's) to a temporary
folder; a real dataset's ``train`` folder (``<class>/<images>``) measures its own decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from rehearse_paper import teacher_config, write_images

from clt_explorer.data import DatasetMissing, grouped_image_batches
from clt_explorer.data.folder import image_folder
from clt_explorer.training.train import default_device

TOKENS_PER_IMAGE = 50  # ViT-B/32 at 224 pixels: 49 patches and CLS
CHUNK_IMAGES, BATCH_IMAGES = 256, 64  # TrainConfig's defaults


def loader_rates(dataset, transform, workers: int, device: torch.device) -> dict:
    """One loader over the whole dataset onto ``device``: the seconds to its first batch (the workers' start) and the
    images a second after it (what a pass of many batches runs at once the workers are going)."""
    groups = [range(first, min(first + CHUNK_IMAGES, len(dataset))) for first in range(0, len(dataset), CHUNK_IMAGES)]
    started = time.perf_counter()
    first_batch_at, after_first = None, 0
    for pixels, _, _ in grouped_image_batches(dataset, transform, BATCH_IMAGES, groups, workers, device):
        pixels.to(device, non_blocking=True)  # as Teacher.on_device
        if first_batch_at is None:
            first_batch_at = time.perf_counter()
        else:
            after_first += len(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"workers": workers, "first_batch_s": round(first_batch_at - started, 3),
            "images_per_s": round(after_first / (time.perf_counter() - first_batch_at), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="a folder of <class>/<images> (default: generated images)")
    parser.add_argument("--images", type=int, default=4000, help="how many images to generate without --folder")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--workers", default=",".join(str(n) for n in sorted({0, 1, 2, 4, 8, cores - 1})
                                                        if 0 <= n < cores),
                        help="worker counts to measure (default: 0, 1, 2, 4, 8 and the cores but one, below the cores)")
    args = parser.parse_args(argv)
    device = default_device()
    _, preprocess = teacher_config("vit-b-32")
    transform = open_clip.image_transform(preprocess["size"], is_train=False, mean=preprocess["mean"],
                                          std=preprocess["std"], interpolation=preprocess["interpolation"],
                                          resize_mode=preprocess["resize_mode"])
    with tempfile.TemporaryDirectory(prefix="clt-loading-") as scratch:
        folder = args.folder
        if folder is None:
            folder = Path(scratch) / "train"
            write_images(folder, "train", args.images)
        try:
            dataset = image_folder(folder.parent, folder.name)
        except DatasetMissing as error:
            raise SystemExit(str(error)) from error
        loader_rates(dataset, transform, 0, device)  # warm: the files in the page cache, as on every later epoch
        print(f"{len(dataset)} images from {args.folder or 'generated 64-pixel PNG files'}, {cores} CPU cores, onto "
              f"{device}; "
              f"images/s after the first batch\n{'workers':>7} {'first batch s':>13} {'images/s':>9} "
              f"{'ViT-B/32 tokens/s fed':>22}")
        rows = []
        for workers in (int(n) for n in args.workers.split(",")):
            row = loader_rates(dataset, transform, workers, device)
            rows.append(row)
            print(f"{workers:7d} {row['first_batch_s']:13.2f} {row['images_per_s']:9.0f} "
                  f"{row['images_per_s'] * TOKENS_PER_IMAGE:22,.0f}", flush=True)
    print(json.dumps({"images": len(dataset), "cores": cores, "device": str(device), "folder": str(args.folder or ""),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
