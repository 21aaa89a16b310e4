"""Safe, atomic file I/O: every file is written to a temporary name and renamed into place, so a
crash leaves either the old file or the new one, never half of one; weights are only safetensors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it) and restored
os.umask(_UMASK)


class AssetError(ValueError):
    """An asset file is missing, corrupt or inconsistent; the message names the file and the problem."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced (unless not ``durable``: a cache that a crash
    may lose, whose readers must still never see half a file), given the permissions of a file made with ``open``
    (mkstemp's are owner-only) and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if needed) without waiting; yields whether it was obtained.
    The operating system releases it when the process ends, however it ends. Where there is no ``fcntl``
    (Windows), it yields True and locks nothing."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising :class:`AssetError` naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: file is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AssetError(f"{path}: not valid JSON ({error})") from error


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write bytes atomically (fsynced when ``durable``, see :func:`atomic_path`)."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors made contiguous, on the CPU)."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu",
                 cast: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, raising :class:`AssetError` naming the file when it is missing or corrupt.
    With ``cast`` (name, tensor -> tensor), tensors are read and converted one at a time, each through
    its own memory map, so that peak memory is the converted total plus one tensor."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: file is missing")
    try:
        if cast is None:
            return load_file(str(path), device=str(device))
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
        tensors = {}
        for name in names:
            with safe_open(str(path), "pt") as f:
                tensors[name] = cast(name, f.get_tensor(name)).to(device)
        return tensors
    except (SafetensorError, OSError, ValueError) as error:
        raise AssetError(f"{path}: not a readable safetensors file ({error})") from error


def check_keys(data: dict, required: set[str], optional: set[str], where: str) -> None:
    """Reject a JSON object with missing or unknown keys, naming the file and the keys."""
    if not isinstance(data, dict):
        raise AssetError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = required - data.keys()
    unknown = data.keys() - required - optional
    if missing:
        raise AssetError(f"{where}: missing keys {sorted(missing)}")
    if unknown:
        raise AssetError(f"{where}: unknown keys {sorted(unknown)}")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hugging Face Hub repo id ``owner/name``."""
    return isinstance(text, str) and bool(_REPO_ID.match(text)) and ".." not in text


def download_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                      allow_patterns: list[str] | None = None) -> Path:
    """A Hub repo's files through huggingface_hub (from its cache when offline: asked for as such, since
    huggingface_hub 1.33 otherwise lists a pinned commit's files on the Hub even offline, and fails where its cache has
    no listing of that commit); failures become an :class:`AssetError` that names the repo and the reason."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns,
                                      local_files_only=constants.HF_HUB_OFFLINE))
    except Exception as error:  # the hub raises many types (offline, 404, auth, HTTP)
        raise AssetError(f"could not fetch {repo_id!r} (revision {revision or 'main'}) from the Hugging Face "
                         f"Hub: {error}") from error
