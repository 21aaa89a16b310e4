"""Attribution graphs: which features, through which paths, build one image's prediction.

In the linearised replacement model (:mod:`.linearised`) every target, a feature's pre-activation or a class logit,
is an affine function of the nodes: ``target = sum over sources of edge + bias``. The edge from a source node to a
target is the source's value times the target's gradient with respect to it (for a d-vector node, error or
embedding, the dot product of the two); the bias is the target at all-zero nodes (encoder and decoder biases,
LayerNorm and attention biases). Rows are computed by transposed passes of the linearised model batched over
targets (:meth:`LinearisedReplacement.edges`), up to ``batch_rows`` rows of one target layer at a time, never per
edge.

The logit of class c is the readout (final LayerNorm, projection, normalisation, cosine with c's text embedding,
logit scale) linearised at this image by its gradient, exactly as the Features tab's direct attribution, so that
with only the last block replaced a feature's edge to the logit is its direct attribution.

Nodes are ordered as circuit-tracer orders them: features (layer, token, feature), error nodes (layer-major, L x T),
embeddings (T), logits. A feature's **total effect** on a logit is its value times the logit's gradient with respect
to it when every later active feature follows its own pre-activation (:func:`total_effects`): the effect of removing
it in the linearised model, through every path. The same numbers follow from the adjacency,
``g (I - W)^-1 * a`` with W the feature-to-feature gradients (:func:`total_effects_from_adjacency`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .attribution import readout_gradient
from .clt import CrossLayerTranscoder
from .linearised import LinearisedReplacement
from .teacher import Teacher
from .zeroshot import ZeroShotClassifier

BATCH_ROWS = 128  # target rows per transposed pass: its [rows, T, d] cotangents are 20 MB at ViT-B/32 size
MAX_FEATURE_NODES = 4096  # the features traced as targets, the largest by |total effect| (a 12-layer CLS graph has
# 12 x k = 1536); the others' contributions to traced rows are kept apart in ``untraced``


@dataclass
class AttributionGraph:
    """An image's attribution graph. ``adjacency[target, source]``; rows of error and embedding nodes are zero.
    For every feature and logit row: ``adjacency[row].sum() + bias[row] + untraced[row] == target_values[row]``."""

    features: torch.Tensor  # [n_f, 3] (layer, token position, feature)
    activations: torch.Tensor  # [n_f]
    error_norms: torch.Tensor  # [L, T] the norm of each error node's vector (0 where the CLT replaces the MLP)
    classes: list[int]
    classnames: list[str]
    probabilities: torch.Tensor  # [C] of the chosen classes, softmax over every class of the replaced model
    adjacency: torch.Tensor  # [N, N]
    bias: torch.Tensor  # [N]
    untraced: torch.Tensor  # [N] what features left out of the graph (beyond max_feature_nodes) add to a row
    target_values: torch.Tensor  # [N] pre-activations (features), logits; 0 for error and embedding nodes
    n_layers: int
    n_tokens: int
    dictionary_size: int  # F, features per layer
    grid: tuple[int, int]
    tokens: str
    start: int
    seconds: float

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    def embedding_node(self, token: int) -> int:
        return self.n_features + self.n_layers * self.n_tokens + token

    def logit_node(self, i: int) -> int:
        return self.n_nodes - len(self.classes) + i

    @property
    def logit_weights(self) -> torch.Tensor:
        """[N]: the chosen classes' probabilities renormalised to sum to 1 on the logit nodes (circuit-tracer weighs
        its logits by their probabilities), zero elsewhere."""
        weights = torch.zeros(self.n_nodes)
        weights[self.n_nodes - len(self.classes):] = self.probabilities / self.probabilities.sum()
        return weights


def _entry_positions(model: LinearisedReplacement) -> list[torch.Tensor]:
    """Per layer [T', m]: the token position of each entry of the codes."""
    first = model.index.start or 0
    return [torch.arange(first, first + v.shape[0], device=v.device)[:, None].expand_as(v) for v in model.values]


def total_effects(model: LinearisedReplacement, gradient: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [T', m]: each active entry's total effect on the target ``gradient . final CLS residual`` (a class
    logit linearised by its gradient), through every path of the linearised model; 0 on inactive entries. One
    forward and one backward pass, whatever the number of features."""
    nudges = [torch.zeros_like(v, requires_grad=True) for v in model.values]
    with torch.enable_grad():
        _, final = model.forward(model.embeddings, model.errors, model.values, live=True, nudges=nudges)
        grads = torch.autograd.grad(final @ gradient.to(final), nudges, allow_unused=True)
    return [(g if g is not None else torch.zeros_like(v)) * v for g, v in zip(grads, model.values)]


def feature_total_effects(model: LinearisedReplacement, gradient: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [F]: each feature's total effect (:func:`total_effects`) summed over the replaced tokens, the effect
    of scaling it to 0 at every token, as an intervention does, in the linearised model."""
    out = []
    for effects, codes in zip(total_effects(model, gradient), model.codes):
        totals = effects.new_zeros(codes.n_features)
        out.append(totals.index_add_(0, codes.indices.flatten().to(effects.device), effects.flatten()))
    return out


def _select_features(model: LinearisedReplacement, gradients: torch.Tensor, limit: int) -> list[torch.Tensor]:
    """Per layer [T', m] bool: the active entries traced as targets, all of them or the ``limit`` largest by
    |total effect| on the sum of the chosen logits (``gradients``: their readout gradients [C, d])."""
    active = [v != 0 for v in model.values]
    if sum(int(a.sum()) for a in active) <= limit:
        return active
    effects = [e.abs() for e in total_effects(model, gradients.sum(0))]
    flat = torch.cat([e.flatten() for e in effects])
    threshold = flat.topk(limit).values[-1]
    chosen, left = [], limit
    for e, a in zip(effects, active):
        keep = a & (e >= threshold)
        if int(keep.sum()) > left:  # ties at the threshold: first come, first kept
            keep = keep & (keep.flatten().cumsum(0) <= left).view_as(keep)
        chosen.append(keep)
        left -= int(keep.sum())
    return chosen


def attribution_graph(teacher: Teacher, clt: CrossLayerTranscoder, classifier: ZeroShotClassifier,
                      pixels: torch.Tensor, start: int, tokens: str, term_weights: torch.Tensor | None = None,
                      classes: list[int] | None = None, max_feature_nodes: int = MAX_FEATURE_NODES,
                      batch_rows: int = BATCH_ROWS) -> AttributionGraph:
    """The attribution graph of one image (``pixels`` [1, 3, H, W]) in the cascade replacing blocks start..L-1 for
    ``tokens`` with the term mask ``term_weights``, towards the logits of ``classes`` (default: the replaced model's
    top-1)."""
    began = time.perf_counter()
    if max_feature_nodes < 1 or batch_rows < 1:
        raise ValueError(f"max_feature_nodes and batch_rows must be at least 1, got {max_feature_nodes} and "
                         f"{batch_rows}")
    model = LinearisedReplacement(teacher, clt, pixels, start, tokens, term_weights)
    L, T = model.n_layers, model.n_tokens
    final = model.final_cls
    all_logits = classifier.logits(teacher.readout(final[None]))[0]
    classes = [int(all_logits.argmax())] if classes is None else [int(c) for c in classes]
    if not classes or any(not 0 <= c < len(classifier.classnames) for c in classes):
        raise ValueError(f"classes must be given as indices in [0, {len(classifier.classnames) - 1}], got {classes}")
    gradients = readout_gradient(teacher, classifier, final)[classes]  # [C, d]
    traced = _select_features(model, gradients, max_feature_nodes)
    positions = _entry_positions(model)
    layers = [torch.full_like(v, i, dtype=torch.long) for i, v in enumerate(model.values)]
    flat_traced = torch.cat([t.flatten() for t in traced])
    features = torch.stack([torch.cat([x.flatten() for x in parts])[flat_traced]
                            for parts in (layers, positions, [c.indices for c in model.codes])], dim=1).cpu()
    activations = torch.cat([v.flatten() for v in model.values])[flat_traced].cpu()
    n_f, C = features.shape[0], len(classes)
    N = n_f + L * T + T + C
    node_of_entry = torch.full((flat_traced.numel(),), -1, dtype=torch.long)  # column of each code entry, or -1
    node_of_entry[flat_traced.cpu()] = torch.arange(n_f)
    sizes = [v.numel() for v in model.values]
    node_of_entry = list(node_of_entry.split(sizes))

    adjacency, untraced = torch.zeros(N, N), torch.zeros(N)

    def fill(rows: torch.Tensor, layer: int, seeds: torch.Tensor) -> None:
        """Edges into ``rows`` from one transposed pass (:meth:`LinearisedReplacement.edges`)."""
        from_embeddings, from_errors, from_values = model.edges(layer, seeds)
        adjacency[rows, n_f + L * T: n_f + L * T + T] = from_embeddings.cpu()
        adjacency[rows, n_f: n_f + L * T] = from_errors.flatten(1).cpu()
        for source, edges in enumerate(from_values):
            if edges is None:
                continue
            edges, columns = edges.flatten(1).cpu(), node_of_entry[source]
            inside = columns >= 0
            adjacency[rows[:, None], columns[inside][None, :]] = edges[:, inside]
            untraced[rows] += edges[:, ~inside].sum(1)

    offset = 0
    for layer, chosen in enumerate(traced):
        count = int(chosen.sum())
        token_rows, entry_rows = chosen.nonzero(as_tuple=True)
        for begin in range(0, count, batch_rows):
            t, m = token_rows[begin:begin + batch_rows], entry_rows[begin:begin + batch_rows]
            seeds = model.embeddings.new_zeros(len(t), T, model.embeddings.shape[-1])
            seeds[torch.arange(len(t)), positions[layer][t, m]] = model.encoder_columns[layer][t, m]
            fill(torch.arange(offset + begin, offset + begin + len(t)), layer, seeds)
        offset += count
    fill(torch.arange(N - C, N), L, gradients.to(model.embeddings))

    with torch.no_grad():  # the bias: every target at all-zero nodes
        zero_xs, zero_final = model.forward(torch.zeros_like(model.embeddings), torch.zeros_like(model.errors),
                                            [torch.zeros_like(v) for v in model.values])
        bias, target_values = torch.zeros(N), torch.zeros(N)
        offset = 0
        for layer, chosen in enumerate(traced):
            count = int(chosen.sum())
            bias[offset:offset + count] = model.preactivations(layer, zero_xs[layer])[chosen].cpu()
            target_values[offset:offset + count] = model.preactivations(layer, model.xs[layer])[chosen].cpu()
            offset += count
        logits = all_logits[classes]
        bias[N - C:] = (logits + gradients @ (zero_final - final)).cpu()
        target_values[N - C:] = logits.cpu()
    return AttributionGraph(features, activations, model.errors.norm(dim=-1).cpu(), classes,
                            [classifier.classnames[c] for c in classes], torch.softmax(all_logits, -1)[classes].cpu(),
                            adjacency, bias, untraced, target_values, L, T, clt.config.n_features, teacher.grid,
                            tokens, start, time.perf_counter() - began)


def total_effects_from_adjacency(graph: AttributionGraph, logit: int = 0) -> torch.Tensor:
    """[n_f]: each feature's total effect on logit ``logit`` from the graph's edges alone: with W[j, i] = edge(i ->
    j) / a_i among features and g_i = edge(i -> logit) / a_i, the effect is (g (I - W)^-1)_i a_i (a feature's value
    follows its pre-activation with gain 1). Equal to :func:`total_effects` when every feature is traced."""
    n_f, a = graph.n_features, graph.activations
    W = graph.adjacency[:n_f, :n_f] / a[None, :]
    g = graph.adjacency[graph.logit_node(logit), :n_f] / a
    y = torch.linalg.solve((torch.eye(n_f) - W).T.double(), g.double())
    return (y * a.double()).float()
