"""Build complete clt-explorer bundles: train CLTs, evaluate them, index retrieval, write thumbnails.

Every step is skipped when its output exists and is complete; an interrupted CLT training resumes
from its latest checkpoint. A summary table at the end says what was built, skipped or failed.

Examples:
    python scripts/train_all.py --preset demo --out checkpoints
    python scripts/train_all.py --preset quick --data-root ~/data/cifar100 --out checkpoints
    torchrun --nproc_per_node 8 scripts/train_all.py --preset paper --data-root /data/DATASET --out bundles
    python scripts/train_all.py --preset demo --out checkpoints --push-to-hub me/clt-demo

--data-root is the folder of the chosen dataset: cifar100 (torchvision downloads into it when online),
imagenet100 (an ImageNet copy with train/ and val/ class folders), coco (train2017/, val2017/ and
annotations/), folder (train/ and test/ class folders).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from clt_explorer.assets.bundle import Bundle
from clt_explorer.assets.hub import push_bundle
from clt_explorer.assets.pipeline import BACKBONES, PRESETS, TINY_TEACHER, BundleJob, build_bundles, preset_jobs
from clt_explorer.cli import add_dataclass_arguments, given
from clt_explorer.data import DATASETS
from clt_explorer.model.sparsifiers import SPARSIFIERS
from clt_explorer.training.train import TrainConfig, init_distributed

JOB_FIELDS_HANDLED_HERE = ("dataset", "backbone", "seed")  # plural --datasets/--backbones; the seed is training's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="base settings (default: demo)")
    parser.add_argument("--out", default="checkpoints", help="folder that receives one bundle per dataset x backbone")
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), help="override the preset's datasets")
    parser.add_argument("--backbones", nargs="+",
                        help=f"{', '.join(BACKBONES)}, {TINY_TEACHER} or any open_clip ARCH:PRETRAINED_TAG")
    parser.add_argument("--sparsifiers", nargs="+", choices=list(SPARSIFIERS),
                        help=f"one CLT per sparsifier (default: {' '.join(SPARSIFIERS)})")
    parser.add_argument("--data-root", help="folder of the dataset (see above)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--push-to-hub", metavar="OWNER/REPO", help="upload the finished bundle (one bundle only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(job_fields=add_dataclass_arguments(parser, BundleJob, JOB_FIELDS_HANDLED_HERE, "bundle"),
                        train_fields=add_dataclass_arguments(parser, TrainConfig, (), "training"))
    return parser.parse_args(argv)


def jobs_from_args(args: argparse.Namespace):
    overrides = given(args, args.job_fields)
    if args.sparsifiers:
        overrides["sparsifiers"] = tuple(args.sparsifiers)
    return preset_jobs(args.preset, args.datasets, args.backbones, args.data_root, given(args, args.train_fields),
                       **overrides)


def print_summary(reports, seconds: float) -> None:
    print(f"\n{'bundle':28} {'step':22} {'status':8} {'seconds':>8}  detail")
    for r in reports:
        print(f"{r.bundle:28} {r.step:22} {r.status:8} {r.seconds:8.1f}  {r.detail}")
    counts = {status: sum(r.status == status for r in reports) for status in ("built", "skipped", "failed")}
    print(f"\n{counts['built']} built, {counts['skipped']} skipped, {counts['failed']} failed in {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, _ = init_distributed()
    jobs = jobs_from_args(args)
    if args.push_to_hub and len(jobs) != 1:
        sys.exit("--push-to-hub uploads one bundle: choose one dataset and one backbone")
    start = time.time()
    device = torch.device(args.device) if args.device else None
    reports = build_bundles(jobs, args.out, device, progress=not args.no_progress)
    if rank != 0:
        return 0
    print_summary(reports, time.time() - start)
    failed = any(r.status == "failed" for r in reports)
    if args.push_to_hub and not failed:
        url = push_bundle(Bundle.load(Path(args.out) / jobs[0].name), args.push_to_hub)
        print(f"pushed to {url}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
