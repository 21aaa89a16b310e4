"""Where the app's explorer comes from: a bundle that is there, or the offline default bundle that a background
process is still building.

While the default bundle is being built the page is already served: the explorer opens as soon as the bundle
registers its first CLT (which happens once that CLT has its retrieval index), and follows the bundle as the
other CLTs, their indexes and their evaluation arrive, without a restart. The build runs at a lower priority
(``nice``), so that analyses keep the CPU they need, and stops when the app stops (Linux); a later start
resumes it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..assets.build_status import read_status
from ..assets.bundle import Bundle, build_log_file, build_status_file
from .analysis import Explorer

BUILD_NICENESS = 10


@dataclass
class BuildProgress:
    """What the background build is doing, for the page's banner."""

    running: str | None = None
    bar: dict | None = None
    steps: list[dict] = field(default_factory=list)
    finished: bool = False
    failed: list[str] = field(default_factory=list)
    exit_code: int | None = None
    log: Path | None = None


class OpenedBundle:
    """A bundle that is there: the explorer is ready at once."""

    def __init__(self, explorer: Explorer):
        self._explorer = explorer
        self.n_layers = explorer.n_layers
        self.clt_names = explorer.clt_names
        self.title = f"{explorer.bundle.teacher_description} · bundle {explorer.bundle.name}"

    @property
    def building(self) -> bool:
        return False

    def explorer(self) -> Explorer:
        return self._explorer

    def progress(self) -> BuildProgress | None:
        return None


def _start_quietly() -> None:
    """In the build process before it runs: a lower priority, and (Linux) a SIGTERM when the app dies."""
    os.nice(BUILD_NICENESS)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the build goes on and a later start waits for its lock
        pass


class GrowingBundle:
    """A bundle folder that a build is filling: the explorer opens once the bundle registers a CLT, and re-reads
    the bundle whenever its manifest changes."""

    def __init__(self, root: Path, n_layers: int, clt_names: list[str], title: str,
                 device: str | torch.device = "cpu", clt_dtype: torch.dtype | None = None):
        self.root, self.n_layers, self.clt_names, self.title = Path(root), n_layers, clt_names, title
        self.device, self.clt_dtype = device, clt_dtype
        self._explorer: Explorer | None = None
        self._lock = threading.Lock()

    @property
    def building(self) -> bool:
        return False

    def explorer(self) -> Explorer | None:
        """The explorer once the bundle has a CLT (None before), re-reading the bundle when it has changed."""
        with self._lock:
            if self._explorer is not None:
                self._explorer.refresh()
            elif Bundle.exists(self.root):
                bundle = Bundle.load(self.root)
                if bundle.clt_names:
                    self._explorer = Explorer(bundle, self.device, self.clt_dtype)
            return self._explorer

    def progress(self) -> BuildProgress:
        status = read_status(build_status_file(self.root)) or {}
        return BuildProgress(status.get("running"), status.get("bar"), status.get("steps", []),
                             status.get("finished", False), status.get("failed", []), None,
                             build_log_file(self.root))


class BackgroundBuild(GrowingBundle):
    """The default bundle built by ``python -m clt_explorer.assets.default_bundle`` in a child process."""

    def __init__(self, checkpoints: str | Path, device: str | torch.device = "cpu",
                 clt_dtype: torch.dtype | None = None):
        from ..assets.default_bundle import DEFAULT_N_LAYERS, default_job  # the training stack, only to build

        job = default_job()
        root = Path(checkpoints) / job.name
        super().__init__(root, DEFAULT_N_LAYERS, list(job.sparsifiers), f"{job.teacher_description} · bundle "
                         f"{job.name}", device, clt_dtype)
        root.mkdir(parents=True, exist_ok=True)
        package_parent = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent,
                                                                        os.environ.get("PYTHONPATH")]))}
        with open(build_log_file(root), "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "clt_explorer.assets.default_bundle", str(checkpoints)], stdout=log,
                stderr=subprocess.STDOUT, env=env, preexec_fn=_start_quietly if hasattr(os, "nice") else None)

    @property
    def building(self) -> bool:
        return self.process.poll() is None

    def progress(self) -> BuildProgress:
        progress = super().progress()
        progress.exit_code = self.process.poll()
        return progress

    def stop(self) -> None:
        """End the build (a later start resumes it)."""
        if self.building:
            self.process.terminate()
            self.process.wait(timeout=30)
