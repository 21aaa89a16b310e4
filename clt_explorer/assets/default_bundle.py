"""The offline default bundle: the demo preset (a tiny CLIP trained on synthetic shapes, its CLTs, their indexes and
evaluation), built under ``checkpoints/``. The app starts this build in a background process on its first start
and serves the page meanwhile; the build reports its progress to a status file in the bundle folder, resumes where
an interrupted one stopped, and ends with the same bundle as ``scripts/train_all.py --preset demo``.

    python -m clt_explorer.assets.default_bundle CHECKPOINTS
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import progress
from ..storage import exclusive_lock
from ..training.tiny_clip import TINY_CLIP_CONFIG
from .build_status import StatusWriter, finished_bundles
from .bundle import Bundle, build_lock_file, build_status_file
from .pipeline import BundleJob, StepReport, build_bundles, preset_jobs

DEFAULT_PRESET = "demo"
DEFAULT_N_LAYERS = TINY_CLIP_CONFIG["vision_cfg"]["layers"]


def default_job() -> BundleJob:
    return preset_jobs(DEFAULT_PRESET)[0]


def default_root(checkpoints: str | Path) -> Path:
    return Path(checkpoints) / default_job().name


class BuildRunning(RuntimeError):
    """Another process is building the default bundle."""


def build_default(checkpoints: str | Path, show_progress: bool = True) -> list[StepReport]:
    """Build (or resume) the default bundle under ``checkpoints``, reporting to its status file; one build at a
    time (:class:`BuildRunning` when another process holds the bundle's build lock)."""
    job = default_job()
    root = Path(checkpoints) / job.name
    with exclusive_lock(build_lock_file(root)) as locked:
        if not locked:
            raise BuildRunning(f"another process is building {root} (it holds {build_lock_file(root)})")
        status = StatusWriter(build_status_file(root))
        progress.listen(status.progress)
        reports = build_bundles([job], checkpoints, progress=show_progress, status=status)
        status.done()
    return reports


def default_bundle(checkpoints: str | Path, show_progress: bool = True) -> Bundle:
    """The first finished bundle under ``checkpoints`` (by name), else the default bundle built there now."""
    found = finished_bundles(checkpoints)
    if found:
        return Bundle.load(found[0])
    failed = [r for r in build_default(checkpoints, show_progress) if r.status == "failed"]
    if failed:
        raise RuntimeError(f"building the offline default bundle failed: {failed}")
    return Bundle.load(default_root(checkpoints))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", help="folder that receives the bundle")
    args = parser.parse_args(argv)
    try:
        reports = build_default(args.checkpoints)
    except BuildRunning as error:
        print(error, file=sys.stderr)
        return 3
    return 1 if any(r.status == "failed" for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
