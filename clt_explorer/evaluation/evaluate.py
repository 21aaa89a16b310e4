"""One pass over held-out images gives every measurement of the paper for one CLT:

- reconstruction per layer (cosine, MSE, R^2) for CLS, patch and all tokens (figures 6-10);
- cascaded replacement s -> L-1 for every start s and token set: zero-shot accuracy beside the
  unmodified teacher's (tables 6-23), with the faithfulness metrics of table 5 for every range;
- dataset-level contribution scores C_{s->l} for CLS and for patch tokens (figures 11-16).

Each batch's teacher pass is encoded and decoded once, for all of them: a cascade starting at s leaves the pass up to
block s's MLP as the teacher's, so it resumes after block s from that pass's residual stream, codes and terms, block
s's output changed by its replacement (:meth:`Teacher.encode_resumed`), and runs, encodes and decodes only blocks
s+1..L-1.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..data import image_batches
from ..model.clt import CrossLayerTranscoder, normalize_contributions
from ..model.sparsifiers import SparseCodes
from ..model.teacher import Capture, MLPSurrogate, Teacher
from ..model.tokens import TOKEN_SETS, token_index
from ..model.zeroshot import ZeroShotClassifier
from ..progress import tqdm
from .metrics import FaithfulnessAccumulator, ReconstructionAccumulator

RESULTS_VERSION = 2  # 2: contributions for all token sets, per-template accuracies; older results are recomputed


class ReplacementEvaluator:
    """Accumulates zero-shot faithfulness of a surrogate under cascades s -> L-1 for each token set."""

    def __init__(self, teacher: Teacher, classifier: ZeroShotClassifier, make_surrogate: Callable[[], MLPSurrogate],
                 token_sets: Sequence[str] = TOKEN_SETS, starts: Sequence[int] | None = None):
        self.teacher, self.classifier, self.make_surrogate = teacher, classifier, make_surrogate
        self.token_sets = list(token_sets)
        self.starts = list(range(teacher.n_layers)) if starts is None else list(starts)
        n_templates = len(classifier.templates)
        self.accumulators = {(tokens, start): FaithfulnessAccumulator(n_templates)
                             for tokens in self.token_sets for start in self.starts}

    @torch.no_grad()
    def update(self, labels: torch.Tensor, capture: Capture, codes: list, terms: list) -> None:
        """One batch: the teacher's pass ``capture`` with the residual stream leaving every start, and the
        surrogate's codes and terms of that pass at every layer (what :meth:`MLPSurrogate.resume` takes)."""
        c, teacher_embeddings = self.classifier, capture.embeddings
        teacher_logits, teacher_templates = c.logits(teacher_embeddings), c.template_logits(teacher_embeddings)
        for (tokens, start), accumulator in self.accumulators.items():
            embeddings, _ = self.teacher.encode_resumed(self.make_surrogate(), capture.below(start, codes, terms),
                                                        tokens)
            accumulator.update(labels, teacher_embeddings, embeddings, teacher_logits, c.logits(embeddings),
                               teacher_templates, c.template_logits(embeddings))

    def result(self) -> dict:
        """{"baseline": teacher accuracy (%), tokens: [per start: metrics]}."""
        out: dict = {"starts": self.starts}
        for tokens in self.token_sets:
            out[tokens] = [{"start": start, **self.accumulators[tokens, start].result()} for start in self.starts]
        out["baseline"] = out[self.token_sets[0]][0]["teacher_accuracy"]
        return out


class CodeEvaluator:
    """Accumulates reconstruction quality and contribution norms of a CLT per token set."""

    def __init__(self, clt: CrossLayerTranscoder, token_sets: Sequence[str] = TOKEN_SETS):
        c = clt.config
        self.clt = clt
        self.reconstruction = {tokens: ReconstructionAccumulator(c.n_layers, c.d_model) for tokens in token_sets}
        self.contribution_norms = {tokens: torch.zeros(c.n_layers, c.n_layers, dtype=torch.float64)
                                   for tokens in TOKEN_SETS}
        self.l0 = torch.zeros(c.n_layers, dtype=torch.float64)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, ys: torch.Tensor, codes: list[SparseCodes], terms: list[torch.Tensor]) -> None:
        """ys [L, B, T, d] from the unmodified teacher, the CLT's codes of its x_l (teacher forcing) and their terms
        [B, T, L - s, d] per source s (:meth:`CrossLayerTranscoder.decode_source`)."""
        yhat = self.clt.sum_terms(terms)
        for tokens, accumulator in self.reconstruction.items():
            index = token_index(tokens)
            accumulator.update(ys[:, :, index].flatten(1, 2), yhat[:, :, index].flatten(1, 2))
        for tokens in self.contribution_norms:
            self.contribution_norms[tokens] += self.clt.term_norms(terms, token_index(tokens)).cpu()
        self.l0 += torch.stack([c.l0().double().sum().cpu() for c in codes])
        self.n_tokens += ys.shape[1] * ys.shape[2]

    def result(self) -> dict:
        return {
            "reconstruction": {tokens: acc.result() for tokens, acc in self.reconstruction.items()},
            "contributions": {tokens: normalize_contributions(norms).tolist()
                              for tokens, norms in self.contribution_norms.items()},
            "l0": (self.l0 / self.n_tokens).tolist(),
        }


def evaluate_clt(teacher: Teacher, clt: CrossLayerTranscoder, dataset: Dataset, classifier: ZeroShotClassifier,
                 batch_size: int = 64, max_images: int | None = None, token_sets: Sequence[str] = TOKEN_SETS,
                 starts: Sequence[int] | None = None, num_workers: int = 0, progress: bool = True) -> dict:
    """Every measurement of one CLT on (the first ``max_images`` of) a held-out dataset, in one pass."""
    n_images = len(dataset) if max_images is None else min(max_images, len(dataset))
    reconstruction = CodeEvaluator(clt, token_sets)
    replacement = ReplacementEvaluator(teacher, classifier, clt.surrogate, token_sets, starts)
    batches = image_batches(dataset, teacher.preprocess, batch_size, range(n_images), num_workers, teacher.device)
    for pixels, labels, _ in tqdm(batches, desc=f"evaluating {clt.config.sparsifier}", disable=not progress):
        capture = teacher.capture(pixels, residuals_at=replacement.starts)
        codes = clt.encode_sparse(capture.xs)
        terms = list(clt.source_terms(codes))
        reconstruction.update(capture.ys, codes, terms)
        replacement.update(labels, capture, codes, terms)
    return {"version": RESULTS_VERSION, "n_images": n_images, "sparsifier": clt.config.sparsifier, "k": clt.config.k,
            "expansion": clt.config.expansion, **reconstruction.result(), "cascade": replacement.result()}
