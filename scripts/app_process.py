"""What the scripts that run ``python app.py`` as a user would share: a free port, a fresh copy of the repository,
waiting for the page, and a process's own peak memory."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_copy(target: Path) -> None:
    """The repository's files as a clone would have them, with this working tree's changes (ignored files, such as
    checkpoints/, left out)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def page_up(url: str) -> bool:
    """Whether the page answers 200 now."""
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}")
        if page_up(url):
            return
        time.sleep(0.5)
    raise TimeoutError(f"the app did not answer at {url} within {timeout} s")


def peak_rss_gb(pid: int | str = "self") -> float:
    """A process's own peak resident memory (VmHWM), in GiB: unlike ru_maxrss of a child started by fork+exec, it
    does not inherit the parent's peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")
