"""What a bundle build is doing, written to a JSON file that another process (the app) reads and shows.

The builder reports each step's start and end; the progress bars of the running step report through
:func:`clt_explorer.progress.listen`. Writes are atomic and at most a few per second.

    {"running": "train relu_topk", "bar": {"description": ..., "done": 120, "total": 332},
     "steps": [{"step": "teacher", "status": "built", "seconds": 94.1, "detail": ...}, ...],
     "finished": false, "failed": [], "updated": <unix time>}
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from ..storage import AssetError, read_json, write_json
from .bundle import build_status_file, find_bundles

MIN_INTERVAL_S = 0.5


class StatusWriter:
    """Keeps the status of one build and writes it to ``path``."""

    def __init__(self, path: Path):
        self.path = path
        self.state = {"running": None, "bar": None, "steps": [], "finished": False, "failed": []}
        self._written = 0.0
        self._write()

    def started(self, step: str) -> None:
        self.state.update(running=step, bar=None)
        self._write()

    def finished(self, report) -> None:
        """A step's report (a StepReport) when it ends, built, skipped or failed."""
        self.state["steps"].append({key: value for key, value in asdict(report).items() if key != "bundle"})
        if report.status == "failed":
            self.state["failed"].append(report.step)
        self.state.update(running=None, bar=None)
        self._write()

    def progress(self, description: str, done: float, total: float | None) -> None:
        """A progress-bar listener: the running step's bar."""
        self.state["bar"] = {"description": description, "done": done, "total": total}
        if time.time() - self._written >= MIN_INTERVAL_S:
            self._write()

    def done(self) -> None:
        self.state.update(running=None, bar=None, finished=True)
        self._write()

    def _write(self) -> None:
        self._written = time.time()
        write_json(self.path, {**self.state, "updated": self._written})


def build_unfinished(root: str | Path) -> bool:
    """Whether a build started by the app left ``root`` unfinished (bundles built otherwise have no status)."""
    status = read_status(build_status_file(root))
    return status is not None and not (status["finished"] and not status["failed"])


def finished_bundles(checkpoints: str | Path) -> list[Path]:
    """The bundles under ``checkpoints`` that no unfinished app build is still filling, by name."""
    return [root for root in find_bundles(checkpoints) if not build_unfinished(root)]


def read_status(path: Path) -> dict | None:
    """The last status written to ``path`` (None when there is none or it cannot be read yet)."""
    try:
        return read_json(path) if path.is_file() else None
    except AssetError:  # being replaced: the next read will see it
        return None
