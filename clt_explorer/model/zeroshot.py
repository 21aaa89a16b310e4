"""Zero-shot classification through CLIP's recipe, for real CLIP and the offline tiny CLIP alike.

Class embedding = L2-normalise(mean over templates of L2-normalised text embeddings of
``template.format(classname)``); logits = logit_scale * cos(image embedding, class embedding).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..data import image_batches
from ..data.resources import as_format_strings
from ..progress import tqdm
from ..storage import load_tensors, save_tensors
from .teacher import Teacher


class ZeroShotClassifier:
    """Text classifier of a teacher over class names x prompt templates."""

    def __init__(self, classnames: Sequence[str], templates: Sequence[str], template_weights: torch.Tensor,
                 logit_scale: float):
        self.classnames, self.templates = list(classnames), as_format_strings(templates)
        if template_weights.shape[:2] != (len(self.templates), len(self.classnames)):
            raise ValueError(f"template weights of shape {tuple(template_weights.shape)} do not fit "
                             f"{len(self.templates)} templates x {len(self.classnames)} classes")
        self.template_weights = template_weights.float()  # [P, C, D], rows L2-normalised
        self.weights = F.normalize(self.template_weights.mean(0), dim=-1)  # [C, D]
        self.logit_scale = logit_scale

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: Teacher, classnames: Sequence[str], templates: Sequence[str],
              batch_size: int = 512) -> "ZeroShotClassifier":
        """Encode every template x class name with the teacher's text tower."""
        if not classnames or not templates:
            raise ValueError("zero-shot classification needs class names and at least one template")
        if not teacher.has_text_tower:
            raise ValueError(f"{teacher.name}: its text tower was freed (Teacher.drop_text_tower); load the teacher "
                             f"again to build a zero-shot classifier")
        per_template = []
        for template in as_format_strings(templates):
            texts = [template.format(name) for name in classnames]
            chunks = [teacher.model.encode_text(teacher.tokenizer(texts[i:i + batch_size]).to(teacher.device))
                      for i in range(0, len(texts), batch_size)]
            per_template.append(F.normalize(torch.cat(chunks).float(), dim=-1))
        return cls(classnames, templates, torch.stack(per_template),
                   float(teacher.model.logit_scale.exp().clamp(max=100.0)))

    @staticmethod
    def _key(teacher: Teacher, classnames: Sequence[str], templates: Sequence[str]) -> dict[str, str]:
        names = hashlib.sha256(json.dumps([list(classnames), as_format_strings(templates)]).encode()).hexdigest()
        return {"teacher": teacher.identity, "names": names}

    def save(self, path: str | Path, teacher: Teacher) -> None:
        """Cache the text embeddings (computing them takes minutes on a CPU for real CLIP)."""
        metadata = {**self._key(teacher, self.classnames, self.templates), "logit_scale": repr(self.logit_scale)}
        save_tensors(path, {"template_weights": self.template_weights}, metadata)

    @classmethod
    def load_or_build(cls, teacher: Teacher, classnames: Sequence[str], templates: Sequence[str],
                      path: str | Path | None) -> "ZeroShotClassifier":
        """The cached classifier at ``path`` when it was made by this teacher for these names, else a new one."""
        if path is not None and Path(path).is_file():
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            if {k: metadata.get(k) for k in ("teacher", "names")} == cls._key(teacher, classnames, templates):
                weights = load_tensors(path)["template_weights"]
                return cls(classnames, templates, weights, float(metadata["logit_scale"]))
        return cls.build(teacher, classnames, templates)

    def logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """[N, C] zero-shot logits of image embeddings [N, D]."""
        image = F.normalize(image_embeddings.float(), dim=-1).to(self.weights.device)
        return self.logit_scale * image @ self.weights.T

    def template_logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """[P, N, C] logits with each template alone (for prompt sensitivity)."""
        image = F.normalize(image_embeddings.float(), dim=-1).to(self.weights.device)
        return self.logit_scale * torch.einsum("nd,pcd->pnc", image, self.template_weights)


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose arg-max is the label."""
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


@torch.no_grad()
def zero_shot_accuracy(teacher: Teacher, dataset, batch_size: int = 256, progress: bool = True) -> float:
    """Top-1 zero-shot accuracy of the unmodified teacher on a dataset, with its class names and templates."""
    classifier = ZeroShotClassifier.build(teacher, dataset.classnames, dataset.templates)
    correct = 0
    batches = image_batches(dataset, teacher.preprocess, batch_size, device=teacher.device)
    for pixels, labels, _ in tqdm(batches, desc="zero-shot accuracy", disable=not progress):
        correct += int((classifier.logits(teacher.encode_images(pixels)).argmax(-1) == labels.to(teacher.device)).sum())
    return correct / len(dataset)
