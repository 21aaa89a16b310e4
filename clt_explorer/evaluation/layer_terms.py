"""The paper's headline experiment: which source-layer terms of the final representation are necessary,
and which are sufficient.

The last layer's reconstruction is a sum of one term per source layer,
``yhat_{L-1} = b_dec[L-1] + sum_s u_{s->L-1}``. With the CLT replacing the chosen tokens' MLP outputs
in blocks start..L-1 (start = L-1 by default: only the final representation), every run keeps a
subset of the sources in that sum through the surrogate's term weights (row L-1; the other rows keep
all their terms) and measures zero-shot accuracy, flip rate and KL against the unmodified teacher:

- ``remove`` / ``single``: each source s alone left out (L runs); the Spearman correlation between
  the dataset's C_{s->L-1} and the accuracy drop of removing s says whether the scores are faithful;
- ``remove`` / ``dataset`` and ``image``: the top-1 source by the dataset's C, or by each image's own
  C (the image's codes in the teacher's pass, over the replaced tokens);
- ``retain`` / ``dataset``, ``image``, ``bottom``, ``random``: only the top-m sources (m = 1..L) by the
  dataset's C, by each image's C, the bottom-m by the dataset's C, or m sources of a random order
  (one shared order per draw; mean and spread over the draws).

Drops are measured against the full replacement (all terms kept), retention against the teacher.

With start = L-1 a run needs no forward pass of its own: everything before the last block's MLP is the
teacher's pass, its codes are the teacher's codes, and after it come only LayerScale, the final
LayerNorm and the projection of the CLS token. The replaced CLS output b_dec + sum_s w_s u_{s->L-1}
goes straight into :meth:`Teacher.readout_with_last_mlp` (patch tokens replaced at the last block
cannot reach the CLS embedding). Other starts run the cascade through the surrogate's term weights;
the tests check that both ways agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.stats
import torch
from torch.utils.data import Dataset

from ..data import image_batches
from ..model.clt import CrossLayerTranscoder, normalize_contributions
from ..model.teacher import Capture, Teacher
from ..model.tokens import PATCHES, TOKEN_SETS, token_index
from ..model.zeroshot import ZeroShotClassifier
from ..progress import tqdm
from .metrics import AgreementAccumulator

RESULTS_VERSION = 1
RANKINGS = ("dataset", "image", "bottom", "random")
CSV_COLUMNS = ["clt", "tokens", "start", "experiment", "ranking", "m", "layer", "accuracy", "flip_rate", "kl",
               "accuracy_sd"]


def source_order(scores: torch.Tensor, ranking: str = "dataset") -> torch.Tensor:
    """Sources ordered for a ranking by their scores C_{s->L-1} [..., L]: strongest first (``dataset``,
    ``image``), weakest first (``bottom``). Ties keep the lower layer first."""
    descending = ranking != "bottom"
    return torch.sort(scores, dim=-1, descending=descending, stable=True).indices


def keep_sources(n_layers: int, kept: torch.Tensor, target: int | None = None) -> torch.Tensor:
    """Term weights [..., L, L] that keep, in row ``target`` (default L-1), only the sources where ``kept``
    [..., L] is true; every other row keeps all its terms."""
    target = n_layers - 1 if target is None else target
    weights = torch.ones(*kept.shape[:-1], n_layers, n_layers)
    weights[..., target, :] = kept.float()
    return weights


def retention_m(n_layers: int) -> int:
    """The m of the summary's "top-m retention": the paper's 4 of 12 layers, a third of the layers (rounded
    up) for other depths."""
    return 4 if n_layers == 12 else max(1, math.ceil(n_layers / 3))


@dataclass(frozen=True)
class Run:
    """One replaced pass with a subset of the final layer's source terms."""

    experiment: str  # remove | retain | full
    ranking: str  # single | dataset | image | bottom | random | all
    m: int  # sources removed (remove) or kept (retain)
    layer: int | None = None  # the removed source, when it is one layer for every image
    draw: int | None = None  # the random order's draw

    def kept(self, orders: dict[str, torch.Tensor], image_order: torch.Tensor) -> torch.Tensor:
        """[B, L] booleans: the sources this run keeps for each image, given the shared orders [L] (``dataset``,
        ``bottom``, ``random`` [draws, L]) and each image's own order [B, L]."""
        batch, n_layers = image_order.shape
        if self.experiment != "retain":
            kept = torch.ones(batch, n_layers, dtype=torch.bool)
            if self.experiment == "remove":
                removed = image_order[:, 0] if self.ranking == "image" else torch.full((batch,), self.layer)
                kept[torch.arange(batch), removed] = False
            return kept
        if self.ranking == "image":
            order = image_order
        else:
            order = orders["random"][self.draw] if self.ranking == "random" else orders[self.ranking]
        top = order.expand(batch, n_layers)[:, :self.m]
        return torch.zeros(batch, n_layers, dtype=torch.bool).scatter_(1, top, True)


def plan_runs(n_layers: int, n_draws: int) -> list[Run]:
    """Every run of the experiment (the top-1 removal by the dataset's C is the single removal of that layer)."""
    runs = [Run("full", "all", n_layers)]
    runs += [Run("remove", "single", 1, s) for s in range(n_layers)]
    runs.append(Run("remove", "image", 1))
    for m in range(1, n_layers + 1):
        runs += [Run("retain", ranking, m) for ranking in ("dataset", "image", "bottom")]
        runs += [Run("retain", "random", m, draw=d) for d in range(n_draws)]
    return runs


@torch.no_grad()
def run_layer_terms(teacher: Teacher, clt: CrossLayerTranscoder, dataset: Dataset, classifier: ZeroShotClassifier,
                    dataset_contributions: dict[str, list[list[float]]], token_sets: Sequence[str] = TOKEN_SETS,
                    start: int | None = None, batch_size: int = 64, max_images: int | None = None,
                    n_draws: int = 5, seed: int = 0, num_workers: int = 0, progress: bool = True) -> dict:
    """The experiment for one CLT over (the first ``max_images`` of) a held-out dataset, every token set.
    ``dataset_contributions[tokens]`` is the dataset's C [L, L] for that token set (from the evaluation)."""
    L = teacher.n_layers
    start = L - 1 if start is None else start
    n_images = len(dataset) if max_images is None else min(max_images, len(dataset))
    generator = torch.Generator().manual_seed(seed)
    random = torch.stack([torch.randperm(L, generator=generator) for _ in range(n_draws)])
    runs = plan_runs(L, n_draws)
    scores = {tokens: torch.tensor(dataset_contributions[tokens][L - 1]) for tokens in token_sets}
    orders = {tokens: {"dataset": source_order(c), "bottom": source_order(c, "bottom"), "random": random}
              for tokens, c in scores.items()}
    accumulators = {(tokens, run): AgreementAccumulator() for tokens in token_sets for run in runs}
    batches = image_batches(dataset, teacher.preprocess, batch_size, range(n_images), num_workers, teacher.device)
    for pixels, labels, _ in tqdm(batches, desc=f"layer terms of {clt.config.sparsifier} CLT", disable=not progress):
        capture = teacher.capture(pixels, residuals_at=[start])
        teacher_logits = classifier.logits(capture.embeddings)
        codes = clt.encode_sparse(capture.xs)
        terms = list(clt.source_terms(codes))
        embed = TermReplacement(teacher, clt, capture, codes, terms, start)
        for tokens in token_sets:
            contributions = normalize_contributions(clt.term_norms(terms, token_index(tokens), per_image=True))
            image_order = source_order(contributions[:, L - 1].cpu(), "image")
            for run in runs:
                logits = classifier.logits(embed(run.kept(orders[tokens], image_order), tokens))
                accumulators[tokens, run].update(labels, teacher_logits, logits)
    results = {tokens: summarize(scores[tokens], orders[tokens]["dataset"],
                                 {run: accumulators[tokens, run].result() for run in runs}, L)
               for tokens in token_sets}
    baseline = next(iter(accumulators.values())).result()["teacher_accuracy"]
    return {"version": RESULTS_VERSION, "n_images": n_images, "start": start, "target": L - 1, "n_draws": n_draws,
            "baseline": baseline,
            "tokens": results}


class TermReplacement:
    """Image embeddings of a batch with the CLT replacing blocks start..L-1 and the final layer keeping only some
    of its source terms. Each replaced pass resumes after block ``start`` from the teacher's pass ``capture`` (with
    the residual stream leaving ``start``), its ``codes`` and their ``terms`` [B, T, L - s, d] per source s; at the
    last block, only the CLS token's output changes."""

    def __init__(self, teacher: Teacher, clt: CrossLayerTranscoder, capture: Capture, codes: list, terms: list,
                 start: int):
        self.teacher, self.clt, self.capture, self.start = teacher, clt, capture, start
        L = clt.config.n_layers
        if start == L - 1:  # u_{s->L-1} at the CLS token from the teacher's own codes: [B, L, d]
            self.cls_terms = torch.stack([terms[s][:, 0, L - 1 - s] for s in range(L)], 1)
        else:
            self.below = capture.below(start, codes, terms)

    @torch.no_grad()
    def __call__(self, kept: torch.Tensor, tokens: str) -> torch.Tensor:
        """Embeddings [B, D] with the sources ``kept`` [B, L] in the final layer's sum."""
        L = self.clt.config.n_layers
        if self.start < L - 1:
            weights = keep_sources(L, kept).to(self.teacher.device)
            return self.teacher.encode_resumed(self.clt.surrogate(term_weights=weights), self.below, tokens)[0]
        if tokens == PATCHES:  # the CLS token keeps its own MLP output, and only it reaches the embedding
            return self.capture.embeddings
        weights = kept.to(self.cls_terms.device, self.cls_terms.dtype)[..., None]
        output = self.clt.b_dec[L - 1].to(self.cls_terms.dtype) + (weights * self.cls_terms).sum(1)
        return self.teacher.readout_with_last_mlp(self.capture, output)


def summarize(scores: torch.Tensor, order: torch.Tensor, measured: dict[Run, dict], n_layers: int) -> dict:
    """Rows of the experiment and its headline numbers for one token set."""
    def row(run: Run, metrics: list[dict], **extra) -> dict:
        mean = {key: float(np.mean([m[source] for m in metrics]))
                for key, source in (("accuracy", "accuracy"), ("flip_rate", "flip_pct"), ("kl", "kl"))}
        return {"experiment": run.experiment, "ranking": run.ranking, "m": run.m, "layer": run.layer, **mean, **extra}

    full = next(m for run, m in measured.items() if run.experiment == "full")
    rows = [row(run, [m]) for run, m in measured.items() if run.ranking != "random"]
    top = int(order[0])
    rows.append({**next(r for r in rows if r["ranking"] == "single" and r["layer"] == top), "ranking": "dataset"})
    for m_kept in range(1, n_layers + 1):
        draws = [m for run, m in measured.items() if run.ranking == "random" and run.m == m_kept]
        accuracies = [d["accuracy"] for d in draws]
        rows.append(row(Run("retain", "random", m_kept), draws, accuracy_sd=float(np.std(accuracies)),
                        draws=accuracies))
    single = {r["layer"]: full["accuracy"] - r["accuracy"] for r in rows if r["ranking"] == "single"}
    drops = [single[s] for s in range(n_layers)]
    spearman = (float(scipy.stats.spearmanr(scores.numpy(), drops).statistic)
                if np.ptp(drops) > 0 and float(scores.max() - scores.min()) > 0 else float("nan"))
    m_summary = retention_m(n_layers)
    retained = {r["ranking"]: r["accuracy"] for r in rows if r["experiment"] == "retain" and r["m"] == m_summary}
    image_removal = next(r for r in rows if r["experiment"] == "remove" and r["ranking"] == "image")
    return {
        "dataset_contributions": scores.tolist(),
        "dataset_order": order.tolist(),
        "full": {"accuracy": full["accuracy"], "flip_rate": full["flip_pct"], "kl": full["kl"]},
        "rows": rows,
        "spearman_c_vs_drop": spearman,
        "top1_removal_drop": {"dataset": single[top], "image": full["accuracy"] - image_removal["accuracy"]},
        "retention_m": m_summary,
        "retention_accuracy": retained,
    }


def summary_lines(name: str, tokens: str, result: dict, baseline: float) -> list[str]:
    """The two-line summary: "top-1 removal costs X points; top-m retention keeps Y% of baseline accuracy"."""
    r = result["tokens"][tokens]
    drop, m = r["top1_removal_drop"], r["retention_m"]
    kept = {ranking: f"{100 * accuracy / baseline:.1f}%" if baseline else "n/a (the teacher scores 0%)"
            for ranking, accuracy in r["retention_accuracy"].items()}
    return [f"{name}, {tokens} tokens: top-1 removal costs {drop['dataset']:.2f} points (ranked by the dataset's C; "
            f"{drop['image']:.2f} by each image's C); Spearman(C, drop) = {r['spearman_c_vs_drop']:.2f}.",
            f"{name}, {tokens} tokens: top-{m} retention keeps {kept['dataset']} of baseline accuracy "
            f"({kept['image']} by each image's C, {kept['random']} for {m} random layers, {kept['bottom']} for the "
            f"bottom {m})."]


def csv_rows(name: str, result: dict) -> list[dict]:
    """The experiment's rows in ``layer_terms.csv``'s columns (random rows: the mean over draws, with its sd)."""
    rows = []
    for tokens, r in result["tokens"].items():
        for row in r["rows"]:
            layer = "" if row["layer"] is None else row["layer"]
            rows.append({"clt": name, "tokens": tokens, "start": result["start"], "experiment": row["experiment"],
                         "ranking": row["ranking"], "m": row["m"], "layer": layer,
                         "accuracy": f"{row['accuracy']:.2f}", "flip_rate": f"{row['flip_rate']:.2f}",
                         "kl": f"{row['kl']:.4f}",
                         "accuracy_sd": f"{row['accuracy_sd']:.2f}" if "accuracy_sd" in row else ""})
    return rows
