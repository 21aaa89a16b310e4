"""CLT training with teacher forcing: single process, or DDP under torchrun (gloo on CPU, nccl on GPU).

Loss = sum_l MSE(yhat_l, y_l) over all tokens
     + aux_coef * sum_l MSE(AuxK_l, residual_l)   dead features reconstruct the detached residual
     + l0_coef * mean_l ((L0_l - k) / k)^2       JumpReLU only: keeps the mean L0 near k

AuxK (Gao et al. 2024): the ``aux_k`` dead features of layer l with the largest pre-activations
reconstruct the residual y_l - yhat_l (detached; the decoder bias is *not* added back) through the
diagonal decoder W_dec[l -> l]; this gives dead features a gradient for all three sparsifiers.
A feature is dead once it has not fired for ``dead_after_tokens`` tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from ..data import loader_workers
from ..evaluation.metrics import ReconstructionAccumulator
from ..model.clt import CONFIG_FILE, WEIGHTS_FILE, CLTConfig, CLTOutput, CrossLayerTranscoder
from ..model.sparsifiers import SparseCodes
from ..model.teacher import Teacher
from ..progress import tqdm
from ..storage import AssetError, check_keys, read_json, write_bytes, write_json
from .activations import ActivationStream, Position
from .checkpointing import load_checkpoint, save_checkpoint
from .outputs import CHECKPOINTS_DIR, LOG_FILE, SETTINGS_FILE, SUMMARY_FILE

# Devices where torch has a fused AdamW kernel (on 2 CPU cores, a 53M-parameter CLT's optimizer step took 27-35 ms
# with it and 69-97 ms without: README, "Multi-GPU and multi-node training").
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the defaults are the paper's (AdamW, lr 2e-4, 10 epochs). Each field's docstring
    is also its ``--help`` text in ``scripts/train_all.py``."""

    epochs: int = 10
    """Passes over the training images."""
    lr: float = 2e-4
    """Peak AdamW learning rate."""
    batch_tokens: int = 4096
    """Tokens per optimisation step (CLS and patch tokens of shuffled images)."""
    chunk_images: int = 256
    """Images whose tokens are shuffled together (the shuffle buffer)."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at this fraction of the peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to the sparsifier's thresholds)."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0: no clipping)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (dead features reconstruct the residual)."""
    aux_k: int = 512
    """Dead features per token that AuxK uses."""
    dead_after_tokens: int = 10_000_000
    """A feature is dead after this many tokens without firing."""
    l0_coef: float = 1.0
    """Weight of the sparsifier's penalty (JumpReLU: ((L0 - k) / k)^2)."""
    threshold_lr_scale: float = 10.0
    """The sparsifier's own parameters (JumpReLU thresholds) learn at this multiple of the learning rate."""
    checkpoint_every: int = 500
    """Steps between checkpoints (a killed run resumes from the last one)."""
    log_every: int = 10
    """Steps between lines of the training log."""
    seed: int = 0
    """Seed of the initialisation and of the data order."""
    max_steps: int | None = None
    """Stop after this many steps (default: all epochs)."""
    image_batch_size: int = 64
    """Images per teacher forward pass while collecting activations."""
    num_workers: int | None = None
    """Image-loading worker processes of the passes over a dataset's images (training, and in a bundle its retrieval
    indexes, feature statistics, evaluation and layer terms); default: on a GPU, this process's CPU cores but one; on
    a CPU, none."""
    sparse_decoder: bool | None = None
    """Decode by a gather of the active rows (on a GPU in Triton kernels) instead of a dense matmul; default: gather
    on a CPU, matmul on a GPU. JumpReLU's gather also reads the inactive codes its straight-through gradient reaches."""

    def loader_workers(self, device: torch.device, batch_bytes: int) -> int:
        """``num_workers``, or where it is not set the default for ``device`` and batches of ``batch_bytes``
        (:func:`data.loader_workers`)."""
        return loader_workers(device, batch_bytes, self.num_workers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "train config") -> "TrainConfig":
        check_keys(data, set(), {f.name for f in dataclasses.fields(cls)}, where)
        return cls(**data)


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return world()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    rank, size = world()
    if size > 1:
        dist.all_reduce(tensor)
        tensor /= size
    return tensor


@torch.no_grad()
def initialize_from_data(clt: CrossLayerTranscoder, xs: torch.Tensor, ys: torch.Tensor) -> None:
    """Data-dependent start: input scales with E||x_l * s_l||^2 = d, b_dec = mean of y, then the sparsifier's
    own start from the scaled pre-activations (JumpReLU: thresholds near the (1 - k/F) quantile)."""
    d = clt.config.d_model
    scale = (d / xs.float().pow(2).sum(-1).mean(-1)).sqrt()
    clt.input_scale.copy_(_all_reduce_mean(scale))
    clt.b_dec.copy_(_all_reduce_mean(ys.float().mean(1)).to(clt.b_dec.dtype))
    for layer in range(clt.config.n_layers):
        clt.sparsifier.initialize(layer, clt.preactivations(layer, xs[layer]), _all_reduce_mean)


class DeadFeatureTracker:
    """Counts, per layer and feature, the tokens seen since the feature last fired (``!= 0``). Its update has no
    shape that depends on the data, so that on a GPU it does not wait for the step to finish (no host sync)."""

    def __init__(self, n_layers: int, n_features: int, dead_after_tokens: int, device: torch.device):
        self.since_fired = torch.zeros(n_layers, n_features, dtype=torch.long, device=device)
        self.dead_after_tokens = dead_after_tokens

    def update(self, codes: list[SparseCodes], n_tokens: int) -> None:
        fired = torch.stack([c.feature_counts() for c in codes])
        rank, size = world()
        if size > 1:
            dist.all_reduce(fired)
        self.since_fired += n_tokens * size
        self.since_fired.masked_fill_(fired > 0, 0)

    @property
    def dead(self) -> torch.Tensor:
        return self.since_fired >= self.dead_after_tokens


def aux_k_loss(clt: CrossLayerTranscoder, out: CLTOutput, ys: torch.Tensor, dead: torch.Tensor,
               aux_k: int) -> torch.Tensor:
    """Sum over layers of MSE(dead-feature reconstruction, detached residual y - yhat); the sparsifier
    chooses the (at most) ``aux_k`` dead codes (:meth:`Sparsifier.aux_codes`); zero without dead features. The dead
    counts of every layer are read at once: on a GPU each read waits for the device (one wait, not two per layer)."""
    total = out.yhat.new_zeros(())
    for layer, (pre, count) in enumerate(zip(out.pre, dead.sum(1).tolist())):
        if not count:
            continue
        codes = clt.sparsifier.aux_codes(pre, dead[layer], min(aux_k, count))
        residual = (ys[layer] - out.yhat[layer]).detach()
        total = total + (clt.decode_diagonal(layer, codes).float() - residual.float()).pow(2).mean()
    return total


def make_optimizer(clt: CrossLayerTranscoder, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the sparsifier's own parameters (JumpReLU thresholds) get ``threshold_lr_scale`` x the learning
    rate and no weight decay: Adam moves each parameter by about its learning rate per step, and thresholds
    must keep up with the encoder to hold L0 near k. Its step is torch's fused kernel where there is one (one pass
    over each parameter's state, where torch's default forms make several; a step's cost grows with the CLT's 850M
    parameters, not with the batch)."""
    thresholds = list(clt.sparsifier.parameters())
    owned = {id(p) for p in thresholds}
    others = [p for p in clt.parameters() if id(p) not in owned]
    groups = [{"params": others, "base_lr": cfg.lr, "lr": cfg.lr}]
    if thresholds:
        lr = cfg.lr * cfg.threshold_lr_scale
        groups.append({"params": thresholds, "base_lr": lr, "lr": lr, "weight_decay": 0.0})
    fused = clt.W_enc.device.type in FUSED_OPTIMIZER_DEVICES or None
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def training_step(model: torch.nn.Module, clt: CrossLayerTranscoder, optimizer: torch.optim.Optimizer,
                  tracker: DeadFeatureTracker, xs: torch.Tensor, ys: torch.Tensor, cfg: TrainConfig,
                  autocast: torch.dtype | None) -> tuple[torch.Tensor, CLTOutput]:
    """One optimisation step on a token batch (``model`` is the CLT or its DDP wrapper)."""
    with torch.autocast(xs.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(xs, cfg.sparse_decoder)
        loss = (out.yhat.float() - ys.float()).pow(2).mean((1, 2)).sum()
        if cfg.aux_coef > 0:  # zero while no feature is dead
            loss = loss + cfg.aux_coef * aux_k_loss(clt, out, ys, tracker.dead, cfg.aux_k)
        penalty = clt.sparsifier.penalty(out.pre) if cfg.l0_coef > 0 else None
        if penalty is not None:
            loss = loss + cfg.l0_coef * penalty
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(clt.parameters(), cfg.grad_clip)
    optimizer.step()
    tracker.update(out.codes, xs.shape[1])
    return loss.detach(), out


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def layer_metrics(out: CLTOutput, ys: torch.Tensor) -> dict[str, list[float]]:
    """Per-layer MSE, fraction of variance unexplained (1 - R^2) and mean L0 of one batch."""
    accumulator = ReconstructionAccumulator(ys.shape[0], ys.shape[-1])
    accumulator.update(ys, out.yhat)
    reconstruction = accumulator.result()
    return {
        "mse": reconstruction["mse"],
        "fvu": [1 - r2 for r2 in reconstruction["r2"]],
        "l0": [float(c.l0().float().mean()) for c in out.codes],
    }


def _truncate_log(path: Path, step: int) -> None:
    """Keep only complete log lines up to ``step`` (a resumed run re-logs what came after)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    write_bytes(path, "".join(f"{line}\n" for line in kept).encode())


@dataclass
class TrainResult:
    clt: CrossLayerTranscoder
    steps: int
    tokens: int
    seconds: float
    resumed_from: int


def is_trained(out_dir: str | Path) -> bool:
    """A run is complete once its summary, final config and weights exist."""
    out_dir = Path(out_dir)
    return all((out_dir / name).is_file() for name in (SUMMARY_FILE, CONFIG_FILE, WEIGHTS_FILE))


def train_clt(teacher: Teacher, dataset: Dataset, clt_config: CLTConfig, cfg: TrainConfig,
              out_dir: str | Path, progress: bool = True) -> TrainResult:
    """Train a CLT on ``teacher``'s activations over ``dataset``; resumable and DDP-aware.

    ``out_dir`` receives the final CLT (config.json + model.safetensors), ``training.json`` (summary),
    ``train_log.jsonl`` and ``checkpoints/``. A complete run is loaded, not retrained; an interrupted
    one resumes from its latest checkpoint with the same data order."""
    out_dir = Path(out_dir)
    rank, world_size = world()
    device = teacher.device
    if is_trained(out_dir):
        summary = read_json(out_dir / SUMMARY_FILE)
        return TrainResult(CrossLayerTranscoder.from_pretrained(out_dir, device=device), summary["steps"],
                           summary["tokens"], summary["seconds"], summary["steps"])
    if clt_config.teacher and clt_config.teacher != teacher.identity:
        raise AssetError(f"CLT config names teacher {clt_config.teacher!r}, training uses {teacher.identity!r}")
    clt_config = dataclasses.replace(clt_config, teacher=teacher.identity)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    workers = cfg.loader_workers(device, teacher.pixel_bytes(cfg.image_batch_size))
    stream = ActivationStream(teacher, dataset, cfg.batch_tokens, cfg.chunk_images, cfg.seed, rank, world_size,
                              cfg.image_batch_size, workers, autocast_dtype=autocast,
                              store_dtype=torch.bfloat16 if autocast else None)
    total_steps = cfg.epochs * stream.batches_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    torch.manual_seed(cfg.seed)
    clt = CrossLayerTranscoder(clt_config, device=device)
    optimizer = make_optimizer(clt, cfg)
    tracker = DeadFeatureTracker(clt_config.n_layers, clt_config.n_features, cfg.dead_after_tokens, device)
    checkpoints = out_dir / CHECKPOINTS_DIR
    restored = load_checkpoint(checkpoints, clt, optimizer, device)
    if restored is None:
        step, tokens, elapsed, position = 0, 0, 0.0, Position()
    else:
        tensors, state = restored
        tracker.since_fired.copy_(tensors["since_fired"])
        step, tokens, elapsed = state["step"], state["tokens"], state["seconds"]
        if set(state["position"]) != {"epoch", "batch"}:
            raise AssetError(f"{checkpoints}: a checkpoint of an earlier version (positions by chunk), which this one "
                             f"cannot resume; delete {checkpoints} to train from the start")
        position = Position(**state["position"])
    resumed_from = step
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / SETTINGS_FILE, {"clt": clt_config.to_dict(), "train": cfg.to_dict()})
        _truncate_log(out_dir / LOG_FILE, step)
    model = DistributedDataParallel(clt) if world_size > 1 else clt
    log = open(out_dir / LOG_FILE, "a") if rank == 0 else None
    bar = tqdm(total=total_steps, initial=step, desc=f"training CLT ({clt_config.sparsifier})",
               disable=not progress or rank != 0)
    started = time.time() - elapsed

    def checkpoint(next_position: Position) -> None:
        if rank == 0:
            save_checkpoint(checkpoints, clt, optimizer, {"since_fired": tracker.since_fired},
                            {"step": step, "tokens": tokens, "seconds": time.time() - started,
                             "position": dataclasses.asdict(next_position)})
        if world_size > 1:
            dist.barrier()

    try:
        while step < total_steps and position.epoch < cfg.epochs:
            for batch in stream.iterate(position):
                xs, ys = batch.xs.to(device), batch.ys.to(device)
                if step == 0:
                    initialize_from_data(clt, xs, ys)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * _lr_factor(step, total_steps, cfg)
                loss, out = training_step(model, clt, optimizer, tracker, xs, ys, cfg, autocast)
                step += 1
                tokens += xs.shape[1] * world_size
                bar.update(1)
                if log is not None and (step % cfg.log_every == 0 or step == total_steps):
                    metrics = layer_metrics(out, ys)
                    record = {"step": step, "epoch": batch.position.epoch, "tokens": tokens,
                              "seconds": round(time.time() - started, 3), "lr": optimizer.param_groups[0]["lr"],
                              "loss": float(loss), **metrics,
                              "dead_fraction": tracker.dead.float().mean(1).tolist()}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    mean_fvu = sum(metrics["fvu"]) / len(metrics["fvu"])
                    bar.set_postfix(loss=f"{float(loss):.4g}", fvu=f"{mean_fvu:.3f}")
                position = stream.next_position(batch.position)
                if step >= total_steps:
                    break
                if step % cfg.checkpoint_every == 0 or position.epoch != batch.position.epoch:
                    checkpoint(position)
        seconds = time.time() - started
        if rank == 0:
            clt.save_pretrained(out_dir)
            write_json(out_dir / SUMMARY_FILE, {"steps": step, "tokens": tokens, "seconds": seconds,
                                                "dead_fraction": float(tracker.dead.float().mean()),
                                                "world_size": world_size})
            shutil.rmtree(checkpoints, ignore_errors=True)  # the final weights supersede them
        if world_size > 1:
            dist.barrier()
    finally:
        bar.close()
        if log is not None:
            log.close()
    return TrainResult(clt, step, tokens, seconds, resumed_from)
