"""Training checkpoints: CLT weights, AdamW state and trainer state, all safetensors + JSON.

Each checkpoint is a folder ``step-NNNNNNNN`` written completely before ``latest.json`` (written
atomically) points at it; older folders are removed afterwards. A kill at any moment leaves
``latest.json`` pointing at a complete checkpoint (or at none yet).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..model.clt import CrossLayerTranscoder
from ..storage import AssetError, load_tensors, read_json, save_tensors, write_json

LATEST = "latest.json"
OPTIMIZER_KERNEL_KEYS = ("fused", "foreach", "capturable")


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {f"{index}.{key}": value for index, slots in state["state"].items()
               for key, value in slots.items() if isinstance(value, torch.Tensor)}
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": param_groups}


def _with_kernels_of(optimizer: torch.optim.Optimizer, param_groups: list[dict]) -> list[dict]:
    """A checkpoint's parameter groups with ``optimizer``'s choice of kernels: its hyperparameters and state resume,
    but how a step is computed (fused, foreach) is the resuming machine's (a checkpoint from an older version, or
    from a device without the fused kernel, would otherwise bring its own)."""
    return [{**saved, **{key: group[key] for key in OPTIMIZER_KERNEL_KEYS if key in group}}
            for saved, group in zip(param_groups, optimizer.param_groups)]


def save_checkpoint(folder: Path, clt: CrossLayerTranscoder, optimizer: torch.optim.Optimizer,
                    trainer_tensors: dict[str, torch.Tensor], trainer_state: dict) -> None:
    """Write checkpoint ``step-N`` under ``folder`` and make it the latest."""
    step = trainer_state["step"]
    target = folder / f"step-{step:08d}"
    if target.exists():
        shutil.rmtree(target)
    clt.save_pretrained(target)
    optimizer_tensors, param_groups = _flatten_optimizer(optimizer.state_dict())
    save_tensors(target / "optimizer.safetensors", optimizer_tensors)
    save_tensors(target / "trainer.safetensors", trainer_tensors)
    write_json(target / "state.json", {**trainer_state, "param_groups": param_groups})
    write_json(folder / LATEST, {"checkpoint": target.name, "step": step})
    for old in folder.glob("step-*"):
        if old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, clt: CrossLayerTranscoder, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Restore the latest checkpoint into ``clt`` and ``optimizer``; returns the trainer's tensors and
    state, or None when there is no checkpoint yet."""
    if not (folder / LATEST).is_file():
        return None
    target = folder / read_json(folder / LATEST)["checkpoint"]
    loaded = CrossLayerTranscoder.from_pretrained(target, device=device)
    if loaded.config != clt.config:
        raise AssetError(f"{target}: checkpoint config {loaded.config} differs from the run's {clt.config}")
    clt.load_state_dict(loaded.state_dict())
    state = read_json(target / "state.json")
    param_groups = state.pop("param_groups")
    optimizer.load_state_dict(_unflatten_optimizer(load_tensors(target / "optimizer.safetensors", device),
                                                   _with_kernels_of(optimizer, param_groups)))
    return load_tensors(target / "trainer.safetensors", device), state
