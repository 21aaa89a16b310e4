"""The offline default teacher: a tiny open_clip CLIP trained contrastively on synthetic shapes.

It is a real ``open_clip.CLIP`` (ViT image tower, transformer text tower, standard tokenizer), saved
in open_clip's own folder format (``open_clip_config.json`` + ``open_clip_model.safetensors``) so
that it loads through exactly the code path of any other teacher: ``local-dir:FOLDER``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from ..data import preprocess_all
from ..data.synthetic import CLASSNAMES, TEMPLATES, SyntheticShapes
from ..model.teacher import LOCAL_DIR, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, Teacher
from ..progress import tqdm
from ..storage import save_tensors, write_json

TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PREPROCESS_CONFIG = {
    "size": 32,
    "mode": "RGB",
    "mean": list(open_clip.OPENAI_DATASET_MEAN),
    "std": list(open_clip.OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def multi_positive_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                        logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss in which every caption of the same class is a positive."""
    logits = logit_scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    positives = (labels[:, None] == labels[None, :]).float()
    target = positives / positives.sum(1, keepdim=True)
    image_to_text = -(target * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(target * logits.T.log_softmax(1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def save_open_clip_folder(model: open_clip.CLIP, model_cfg: dict, preprocess_cfg: dict, folder: str | Path) -> None:
    """Write open_clip's folder format, loadable with ``local-dir:FOLDER``."""
    folder = Path(folder)
    save_tensors(folder / OPEN_CLIP_WEIGHTS, model.state_dict())
    write_json(folder / OPEN_CLIP_CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})


def train_tiny_clip(folder: str | Path, steps: int = 600, batch_size: int = 256, lr: float = 3e-3,
                    n_train: int = 20000, seed: int = 0, progress: bool = True) -> Teacher:
    """Train the tiny CLIP on synthetic shapes (CPU, a few minutes), save it to ``folder``, return it
    loaded back from disk as a :class:`Teacher`."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**copy.deepcopy(TINY_CLIP_CONFIG))
    transform = open_clip.image_transform(PREPROCESS_CONFIG["size"], is_train=False,
                                          mean=PREPROCESS_CONFIG["mean"], std=PREPROCESS_CONFIG["std"],
                                          interpolation="bicubic", resize_mode="shortest")
    tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CONFIG["text_cfg"]["context_length"])
    data = SyntheticShapes("train", n_images=n_train, seed=seed)
    pixels, labels = preprocess_all(data, transform, desc="rendering synthetic shapes", progress=progress)
    captions = torch.stack([tokenizer([t.format(c) for c in CLASSNAMES]) for t in TEMPLATES])  # [P, C, ctx]

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    model.train()
    bar = tqdm(range(steps), desc="training tiny CLIP", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=max(1, steps // 20))
        batch = torch.from_numpy(rng.choice(len(data), size=batch_size, replace=False))
        y = labels[batch]
        text = captions[torch.from_numpy(rng.integers(0, len(TEMPLATES), size=batch_size)), y]
        loss = multi_positive_loss(model.encode_image(pixels[batch]), model.encode_text(text), y,
                                   model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    save_open_clip_folder(model, TINY_CLIP_CONFIG, PREPROCESS_CONFIG, folder)
    return Teacher.load(LOCAL_DIR + str(Path(folder).resolve()))
