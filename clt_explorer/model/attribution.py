"""Where one CLT feature writes and how that moves the zero-shot logits.

A feature (s, f) reads from layer s and writes ``z_s[f] * W_dec[s -> l][f]`` into the MLP output of every
target l >= s: its **reach** is the norm of that decoder row per target, a property of the weights alone.

Its **direct effect** on the logits: in a cascade replacing the MLPs of blocks ``start..L-1``, the rows of the
targets l >= max(s, start) are what the CLT actually writes into the residual stream (through each block's
LayerScale, weighted by the term mask W[l, s]); by the residual connections their sum reaches the final
LayerNorm at the same token unchanged. At the CLS token it then goes through the final LayerNorm, the
projection, the cosine with the class embeddings and the logit scale. That readout is linearised exactly at one
point (the gradient of the logits with respect to the final residual at the CLS token, the LayerNorm's scale
moving with its input), so the direct effect of a unit of code is ``grad_c . direction``. What the feature's
writes do through attention and the later blocks' reading of them (the indirect effect) is not counted; the
attribution ``z_s(CLS)[f] * grad_c . direction`` is validated by ablation (``scripts/feature_attribution.py``).
"""

from __future__ import annotations

import torch

from .clt import CrossLayerTranscoder
from .surrogate import check_feature
from .teacher import Teacher
from .zeroshot import ZeroShotClassifier


def reach(clt: CrossLayerTranscoder, layer: int, feature: int) -> torch.Tensor:
    """||W_dec[s -> l][f]|| for every target l = s..L-1: [L - s]."""
    check_feature(layer, feature, clt.config.n_layers, clt.config.n_features)
    return clt.W_dec[layer][feature].detach().float().norm(dim=-1)


def residual_directions(clt: CrossLayerTranscoder, teacher: Teacher, layer: int, features: torch.Tensor,
                        start: int = 0, term_weights: torch.Tensor | None = None) -> torch.Tensor:
    """What one unit of code of each feature of source ``layer`` adds to the residual stream by the final
    LayerNorm, in a cascade replacing blocks ``start..L-1`` with the term mask ``term_weights`` [L, L]
    (default all ones): sum over targets l >= max(layer, start) of W[l, s] * LayerScale_l(W_dec[s -> l][f]).
    [n, d] for ``features`` [n]."""
    L = clt.config.n_layers
    rows = clt.W_dec[layer].detach()[features.to(clt.W_dec[layer].device)].float()  # [n, L - s, d]
    total = rows.new_zeros(rows.shape[0], rows.shape[-1])
    for target in range(max(layer, start), L):
        weight = 1.0 if term_weights is None else float(term_weights[target, layer])
        if weight:
            total += weight * teacher.blocks[target].ls_2(rows[:, target - layer].to(teacher.device)).float()
    return total


def readout_gradient(teacher: Teacher, classifier: ZeroShotClassifier, final_cls: torch.Tensor) -> torch.Tensor:
    """d logits / d (final residual at the CLS token) at ``final_cls`` [d]: [C, d]. The exact first-order
    linearisation of the final LayerNorm (its scale taken from this point and moving with it), the projection, the
    normalisation of the embedding and the cosine with each class."""
    def logits(x: torch.Tensor) -> torch.Tensor:
        return classifier.logits(teacher.readout(x[None]))[0]

    with torch.enable_grad():
        return torch.func.jacrev(logits)(final_cls.detach().float().to(teacher.device))
