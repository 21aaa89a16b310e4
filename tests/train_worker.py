"""Runs one small CLT training in its own process (for the DDP and kill/resume tests).

usage: python tests/train_worker.py TEACHER_DIR OUT_DIR SPARSIFIER [checkpoint_every]
(or under torchrun). Every rank saves its final weights as OUT_DIR/rank{r}.safetensors.
With KILL_AT=step:N the process SIGKILLs itself after optimizer step N; with
KILL_AT=checkpoint:N it dies halfway through writing its N-th checkpoint (weights written,
optimizer state and pointer not); with KILL_AT=final:1 it dies after writing the final weights,
before the run's summary.
"""

import os
import signal
import sys

import torch

from clt_explorer import CLTConfig
from clt_explorer.data.synthetic import SyntheticShapes
from clt_explorer.model.teacher import LOCAL_DIR, Teacher
from clt_explorer.storage import save_tensors
from clt_explorer.training.train import TrainConfig, init_distributed, train_clt

WORKER_TRAIN_CONFIG = dict(epochs=2, lr=1e-3, batch_tokens=256, chunk_images=32, warmup_steps=3,
                           dead_after_tokens=2000, log_every=1)


def install_kill_switch() -> None:
    """Make this process die by SIGKILL at the point named by $KILL_AT."""
    import clt_explorer.model.clt as clt_module
    import clt_explorer.training.train as train

    where, _, count = os.environ.get("KILL_AT", "").partition(":")
    if not where:
        return
    calls = {"n": 0}

    def die_after(n: int) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if where == "step":
        original_lr = train._lr_factor

        def lr_factor(step, total, cfg):
            die_after(int(count) + 1)  # called at the start of step N+1, i.e. after N steps
            return original_lr(step, total, cfg)

        train._lr_factor = lr_factor
    elif where in ("checkpoint", "final"):
        original_save = clt_module.save_tensors

        def save_tensors_then_die(path, tensors, metadata=None):
            original_save(path, tensors, metadata)
            if ("checkpoints" in str(path)) == (where == "checkpoint"):
                die_after(int(count))

        clt_module.save_tensors = save_tensors_then_die
    else:
        raise ValueError(os.environ["KILL_AT"])


def main() -> None:
    install_kill_switch()
    teacher_dir, out_dir, sparsifier = sys.argv[1:4]
    checkpoint_every = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    torch.set_num_threads(1)
    rank, _ = init_distributed()
    teacher = Teacher.load(LOCAL_DIR + teacher_dir)
    data = SyntheticShapes("train", n_images=96, seed=5)
    config = CLTConfig(teacher.n_layers, teacher.d_model, expansion=2, sparsifier=sparsifier, k=8)
    result = train_clt(teacher, data, config, TrainConfig(**WORKER_TRAIN_CONFIG, checkpoint_every=checkpoint_every),
                       out_dir, progress=False)
    save_tensors(f"{out_dir}/rank{rank}.safetensors", result.clt.state_dict())


if __name__ == "__main__":
    main()
