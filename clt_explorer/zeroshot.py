"""Zero-shot classification through CLIP's recipe, for real CLIP and the offline tiny CLIP alike.

Class embedding = L2-normalise(mean over templates of L2-normalised text embeddings of
``template.format(classname)``); logits = logit_scale * cos(image embedding, class embedding).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .data import image_batches
from .data.resources import as_format_strings
from .teacher import Teacher


class ZeroShotClassifier:
    """Text classifier of a teacher over class names x prompt templates."""

    def __init__(self, teacher: Teacher, classnames: Sequence[str], templates: Sequence[str],
                 batch_size: int = 512):
        if not classnames or not templates:
            raise ValueError("zero-shot classification needs class names and at least one template")
        self.classnames = list(classnames)
        self.templates = as_format_strings(templates)
        per_template = []
        with torch.no_grad():
            for template in self.templates:
                texts = [template.format(name) for name in self.classnames]
                chunks = [teacher.model.encode_text(teacher.tokenizer(texts[i:i + batch_size]).to(teacher.device))
                          for i in range(0, len(texts), batch_size)]
                per_template.append(F.normalize(torch.cat(chunks).float(), dim=-1))
        self.template_weights = torch.stack(per_template)  # [P, C, D]
        self.weights = F.normalize(self.template_weights.mean(0), dim=-1)  # [C, D]
        self.logit_scale = float(teacher.model.logit_scale.exp().clamp(max=100.0))

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
def zero_shot_accuracy(teacher: Teacher, dataset, batch_size: int = 256) -> float:
    """Top-1 zero-shot accuracy of the unmodified teacher on a dataset, with its class names and templates."""
    classifier = ZeroShotClassifier(teacher, dataset.classnames, dataset.templates)
    correct = 0
    for pixels, labels, _ in image_batches(dataset, teacher.preprocess, batch_size):
        correct += int((classifier.logits(teacher.encode_images(pixels)).argmax(-1) == labels.to(teacher.device)).sum())
    return correct / len(dataset)
