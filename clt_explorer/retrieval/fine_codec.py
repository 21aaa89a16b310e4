"""What the fine tier of a compact index learns from a sample of its descriptors before it encodes any, when its rows
cannot keep every entry:

- common features, active in at least ``COMMON_SHARE`` of the sample's rows: every fine row holds a 4-bit code for
  each at a fixed place (:mod:`.fine_rows`), with no position bytes. A tail slot costs 8 bits in the rows that have
  the entry, a common code 4 bits in every row: that would pay from half the rows, but a tight row drops its weakest
  tail entries, while the block codes every row's;
- correction directions U [F, m]: the sample's top right singular vectors (uncentred, so the first is close to the
  mean descriptor). Each image stores U^T (x - x'), the part of what its fine row x' loses (entries left out,
  rounding) that lies along them, and a query q adds (U^T q) . U^T (x - x'): the loss cancels exactly for the part
  of q in span U. Real codes share much of their mass (the demo's patch means: random pairs at cosine 0.55-0.72), so
  most of a query lies there. The coarse tier scores each image's projection U^T x too (:mod:`.compact`).

Why (measured before the projection joined the coarse tier, whose 64 entries then found the candidates; the demo's
real patch means, 10k x 512, indexes built with fine rows of the bytes per non-zero of a true-size row at 5% and the
correction at its true-size share of the bytes; recall@10 on 200 held-out images, ReLU-TopK layer 1 / Abs-TopK layer
1 / JumpReLU layer 1): 0.83 / 0.79 / 0.86 without either; 0.85 / 0.83 / 0.91 with the common block; with it and 8,
16, 32 or 64 directions, 0.94 / 0.91 / 0.96, then 0.95 / 0.92 / 0.96, 0.95 / 0.93 / 0.97 and 0.96 / 0.94 / 0.97.
Where directions cost more (1,500 images of 512 features: 43% of the bytes for 32), the same bytes in the rows rank
better (0.98 against 0.96), hence the cap at a quarter of the bytes; at true size, 32 directions with the projection
take 224 of a 5% row's 2,124 bytes. Common features from half the rows, 2/3, 3/4 or none (fine rows of 150 bytes, 22
directions; ReLU-TopK layer 0 / Abs-TopK layers 0 and 1): 0.92 / 0.86 / 0.88, 0.94 / 0.90 / 0.91, 0.94 / 0.91 / 0.91
and 0.94 / 0.90 / 0.91; from 2/3 or none, ReLU-TopK layers 1 and 3 / JumpReLU layers 1 and 3: 0.95 / 0.97 / 0.96 /
0.96 against 0.94 / 0.95 / 0.95 / 0.94.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fine_rows import NO_COMMON, fits_whole

COMMON_SHARE = 2 / 3


@dataclass
class FineCodec:
    """Sorted ids of the common features and orthonormal correction directions [F, m] (m = 0: no correction)."""

    common: np.ndarray
    directions: np.ndarray


def lossless_codec(n_features: int) -> FineCodec:
    """The codec of rows that keep every entry: nothing to learn."""
    return FineCodec(NO_COMMON, np.zeros((n_features, 0), np.float32))


def fit_fine_codec(sample: np.ndarray, width: int, n_directions: int) -> FineCodec:
    """The codec of fine rows of ``width`` bytes, learnt from descriptors [s, F]: lossless when every sample row fits
    whole, else the common features (at most ``width`` of them, the most frequent: the block takes at most half the
    row) and ``n_directions`` correction directions."""
    n_features = sample.shape[1]
    if len(sample) == 0 or fits_whole(sample, width).all():
        return lossless_codec(n_features)
    share = (sample != 0).mean(0)
    common = np.sort(np.argsort(-share, kind="stable")[:min(width, int((share >= COMMON_SHARE).sum()))])
    if n_directions == 0:
        return FineCodec(common, lossless_codec(n_features).directions)
    _, _, vt = np.linalg.svd(np.asarray(sample, np.float32), full_matrices=False)
    return FineCodec(common, np.ascontiguousarray(vt[:n_directions].T))
