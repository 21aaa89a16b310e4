"""Metrics of reconstruction and of surrogate faithfulness, accumulated over batches in float64.

Every accumulator takes batches with ``update`` and reports with ``result``; nothing stores the
whole dataset, so evaluation memory does not grow with the number of images.
"""

from __future__ import annotations

import numpy as np
import torch


def kl_divergence(teacher_logits: torch.Tensor, surrogate_logits: torch.Tensor) -> torch.Tensor:
    """Per row: KL(p_teacher || p_surrogate) of the softmax distributions (nats)."""
    log_p = teacher_logits.double().log_softmax(-1)
    log_q = surrogate_logits.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks (0..C-1) along the last axis; ties broken by position."""
    return x.argsort(-1).argsort(-1).double()


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: Spearman rank correlation = Pearson correlation of the ranks."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-300)


def top_k_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Per row: |top-k(a) ∩ top-k(b)| / k."""
    k = min(k, a.shape[-1])
    top_a, top_b = a.topk(k, -1).indices, b.topk(k, -1).indices
    return (top_a[:, :, None] == top_b[:, None, :]).any(-1).double().mean(-1)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations [N, D] of the same N items (Kornblith et al. 2019):
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc."""
    acc = CKAAccumulator()
    acc.update(x, y)
    return acc.result()


class CKAAccumulator:
    """Linear CKA from running sums (X^T X, Y^T Y, Y^T X and column sums), D x D memory."""

    def __init__(self):
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double().cpu(), y.double().cpu()
        parts = {"xx": x.T @ x, "yy": y.T @ y, "yx": y.T @ x, "sx": x.sum(0), "sy": y.sum(0)}
        for name, value in parts.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.n += x.shape[0]

    def result(self) -> float:
        s, n = self.sums, self.n
        mx, my = s["sx"] / n, s["sy"] / n
        xx = s["xx"] - n * torch.outer(mx, mx)
        yy = s["yy"] - n * torch.outer(my, my)
        yx = s["yx"] - n * torch.outer(my, mx)
        denominator = (xx.norm() * yy.norm()).item()
        return float(yx.norm().item() ** 2 / denominator) if denominator > 0 else float("nan")


class ReconstructionAccumulator:
    """Per layer: cosine similarity, MSE and R^2 of yhat_l against y_l over a set of tokens.

    cosine = mean over tokens of cos(yhat_l(t), y_l(t)); mse = mean over tokens and channels of
    (yhat - y)^2; R^2 = 1 - SSE / SST with SST = sum over tokens of ||y_l(t) - mean_t y_l||^2."""

    def __init__(self, n_layers: int, d_model: int):
        self.count = 0
        self.sse = torch.zeros(n_layers, dtype=torch.float64)
        self.cosine = torch.zeros(n_layers, dtype=torch.float64)
        self.sum_y = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.sum_y2 = torch.zeros(n_layers, dtype=torch.float64)
        self.d_model = d_model

    def update(self, y: torch.Tensor, yhat: torch.Tensor) -> None:
        """y, yhat: [L, tokens, d]."""
        y, yhat = y.double().cpu(), yhat.double().cpu()
        self.count += y.shape[1]
        self.sse += (yhat - y).pow(2).sum((1, 2))
        self.cosine += torch.nn.functional.cosine_similarity(yhat, y, dim=-1).sum(1)
        self.sum_y += y.sum(1)
        self.sum_y2 += y.pow(2).sum((1, 2))

    def result(self) -> dict[str, list[float]]:
        n = self.count
        sst = self.sum_y2 - self.sum_y.pow(2).sum(-1) / n
        return {
            "cosine": (self.cosine / n).tolist(),
            "mse": (self.sse / (n * self.d_model)).tolist(),
            "r2": (1 - self.sse / sst.clamp_min(1e-300)).tolist(),
        }


def reconstruction_quality(y: torch.Tensor, yhat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer, R^2 and mean cosine of :class:`ReconstructionAccumulator` for one small set of tokens y, yhat
    [L, tokens, d], in their own precision (float32 for an app's analysis of one image: 0.3 ms against 5.4 ms for the
    accumulator's float64 sums at ViT-B/32 size); SST sums the squares of centred values, so that a large mean does
    not cancel."""
    difference = yhat - y
    sse = difference.mul_(difference).sum((1, 2))
    centred = y - y.mean(1, keepdim=True)
    sst = centred.mul_(centred).sum((1, 2))
    return {"r2": 1 - sse / sst.clamp_min(torch.finfo(sst.dtype).tiny),
            "cosine": torch.nn.functional.cosine_similarity(yhat, y, dim=-1).mean(1)}


class AgreementAccumulator:
    """Top-1 agreement of a surrogate with its teacher on the same images.

    - accuracy: top-1 zero-shot accuracy (%) of the surrogate; teacher_accuracy: the teacher's (%)
    - flip_pct: % of images whose top-1 class differs between teacher and surrogate
    - kl: mean over images of KL(p_teacher || p_surrogate), softmax of logit_scale * cosine logits
    """

    def __init__(self):
        self.n = 0
        self.sums = {name: 0.0 for name in ("correct", "teacher_correct", "flip", "kl")}

    def update(self, labels: torch.Tensor, teacher_logits: torch.Tensor, surrogate_logits: torch.Tensor) -> None:
        labels = labels.to(teacher_logits.device)
        t_top, s_top = teacher_logits.argmax(-1), surrogate_logits.argmax(-1)
        self.n += labels.shape[0]
        self.sums["correct"] += float((s_top == labels).sum())
        self.sums["teacher_correct"] += float((t_top == labels).sum())
        self.sums["flip"] += float((s_top != t_top).sum())
        self.sums["kl"] += float(kl_divergence(teacher_logits, surrogate_logits).sum())

    def result(self) -> dict[str, float]:
        n, s = self.n, self.sums
        return {"accuracy": 100 * s["correct"] / n, "teacher_accuracy": 100 * s["teacher_correct"] / n,
                "flip_pct": 100 * s["flip"] / n, "kl": s["kl"] / n}


class FaithfulnessAccumulator:
    """A surrogate against its teacher on the same images (table 5 of the paper): the top-1 agreement of
    :class:`AgreementAccumulator` (accuracy, teacher_accuracy, flip_pct, kl) and

    - delta_acc = accuracy - teacher_accuracy (points); top1_agree = 100 - flip_pct
    - top5_agree: mean % overlap of the two top-5 class sets
    - cos: mean cosine between teacher and surrogate image embeddings
    - cka: linear CKA between the teacher's and the surrogate's embeddings over all images
    - spearman: mean over images of the Spearman rank correlation of the two class-logit vectors
    - prompt_r: Pearson r, across templates, of the teacher's and the surrogate's per-template accuracy
    - prompt_kl: mean over templates of the mean KL(teacher || surrogate) with that template alone
    - template_accuracy: {"teacher": [...], "surrogate": [...]}, the per-template accuracies (%) behind prompt_r
    """

    def __init__(self, n_templates: int):
        self.agreement = AgreementAccumulator()
        self.sums = {name: 0.0 for name in ("top5", "cos", "spearman")}
        self.template_correct = np.zeros((2, n_templates))
        self.template_kl = np.zeros(n_templates)
        self.cka = CKAAccumulator()

    def update(self, labels: torch.Tensor, teacher_embeddings: torch.Tensor, surrogate_embeddings: torch.Tensor,
               teacher_logits: torch.Tensor, surrogate_logits: torch.Tensor,
               teacher_template_logits: torch.Tensor, surrogate_template_logits: torch.Tensor) -> None:
        labels = labels.to(teacher_logits.device)
        self.agreement.update(labels, teacher_logits, surrogate_logits)
        self.sums["top5"] += float(top_k_overlap(teacher_logits, surrogate_logits, 5).sum())
        self.sums["cos"] += float(torch.nn.functional.cosine_similarity(
            teacher_embeddings.double(), surrogate_embeddings.double(), dim=-1).sum())
        self.sums["spearman"] += float(spearman_rows(teacher_logits, surrogate_logits).sum())
        self.template_correct[0] += (teacher_template_logits.argmax(-1) == labels).sum(-1).cpu().numpy()
        self.template_correct[1] += (surrogate_template_logits.argmax(-1) == labels).sum(-1).cpu().numpy()
        self.template_kl += kl_divergence(teacher_template_logits, surrogate_template_logits).sum(-1).cpu().numpy()
        self.cka.update(teacher_embeddings, surrogate_embeddings)

    def result(self) -> dict:
        n, s = self.agreement.n, self.sums
        agreement = self.agreement.result()
        per_template = self.template_correct / n
        if per_template.shape[1] > 1 and per_template.std(1).min() > 0:
            prompt_r = float(np.corrcoef(per_template[0], per_template[1])[0, 1])
        else:  # one template, or constant accuracies: the correlation is undefined
            prompt_r = float("nan")
        return {
            **agreement,
            "delta_acc": agreement["accuracy"] - agreement["teacher_accuracy"],
            "top1_agree": 100 - agreement["flip_pct"],
            "top5_agree": 100 * s["top5"] / n,
            "cos": s["cos"] / n,
            "cka": self.cka.result(),
            "spearman": s["spearman"] / n,
            "prompt_r": prompt_r,
            "prompt_kl": float(self.template_kl.mean() / n),
            "template_accuracy": {"teacher": (100 * per_template[0]).tolist(),
                                  "surrogate": (100 * per_template[1]).tolist()},
        }
