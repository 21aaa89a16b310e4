"""Influence and pruning of an attribution graph, as circuit-tracer defines them.

With A the adjacency's absolute values, each row normalised to sum to 1 (the share of a target's inputs that each
source carries), a node's **influence** on the chosen logits is ``w (A + A^2 + ...)`` = ``w ((I - A)^-1 - I)``, w the
logit weights: the share of the logits' inputs that flows through the node along all paths. Pruning keeps the
feature and error nodes whose influence adds up to ``node_share`` of their total (the largest first; embeddings and
logits are always kept), then, in the graph on those nodes, the edges whose scores (normalised weight times the
influence of the target, logit weights included) add up to ``edge_share`` of the total, and finally drops the kept
features and errors left without an outgoing edge or (features) without an incoming one, until none is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .graph import AttributionGraph


def normalised_adjacency(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with each row divided by its sum (rows without inputs stay zero)."""
    absolute = adjacency.abs()
    return absolute / absolute.sum(1, keepdim=True).clamp(min=1e-12)


def influence(normalised: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w (A + A^2 + ...) for a row-normalised adjacency A of a graph without cycles: the series ends once a power
    is zero, after at most the graph's depth (L + 2 in an attribution graph) products of a vector and A."""
    term, total = weights @ normalised, torch.zeros_like(weights)
    for _ in range(normalised.shape[0] + 1):
        if not term.any():
            return total
        total, term = total + term, term @ normalised
    raise ValueError("the adjacency has a cycle: influence is defined on attribution graphs, which have none")


def shares_threshold(scores: torch.Tensor, share: float) -> float:
    """The smallest score among the largest scores that add up to ``share`` of the total (all of them at 1)."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    position = int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype)))
    return float(ordered[min(position, len(ordered) - 1)])


@dataclass
class PrunedGraph:
    """Which nodes and edges survive, and what they carry: ``node_share`` is the kept feature and error nodes'
    share of their total influence, ``edge_share`` the kept edges' share of the edge scores (both after the
    connectivity clean-up)."""

    node_mask: torch.Tensor  # [N] bool
    edge_mask: torch.Tensor  # [N, N] bool, [target, source]
    node_influence: torch.Tensor  # [N]
    node_share: float
    edge_share: float
    node_threshold: float
    edge_threshold: float


def prune(graph: AttributionGraph, node_share: float = 0.8, edge_share: float = 0.98) -> PrunedGraph:
    """The nodes and edges carrying ``node_share`` and ``edge_share`` of the influence on the graph's logits."""
    for name, share in (("node_share", node_share), ("edge_share", edge_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {share}")
    weights = graph.logit_weights
    node_influence = influence(normalised_adjacency(graph.adjacency), weights)
    prunable = torch.zeros(graph.n_nodes, dtype=torch.bool)
    prunable[:graph.embedding_node(0)] = True  # features and error nodes
    scores = node_influence[prunable]
    node_mask = ~prunable
    node_mask[prunable] = scores >= shares_threshold(scores, node_share) if len(scores) else scores.bool()

    kept = graph.adjacency * node_mask[:, None] * node_mask[None, :]
    normalised = normalised_adjacency(kept)
    edge_scores = normalised * (influence(normalised, weights) + weights)[:, None]
    edge_mask = (edge_scores >= shares_threshold(edge_scores.flatten(), edge_share)) & (edge_scores > 0)

    while True:  # features and errors need an outgoing edge, features an incoming one
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        connected = node_mask.clone()
        connected[prunable] &= edge_mask.any(0)[prunable]
        connected[:graph.n_features] &= edge_mask.any(1)[:graph.n_features]
        if torch.equal(connected, node_mask):
            break
        node_mask = connected
    total = float(node_influence[prunable].sum())
    return PrunedGraph(node_mask, edge_mask, node_influence,
                       float(node_influence[prunable & node_mask].sum()) / total if total > 0 else 1.0,
                       float(edge_scores[edge_mask].sum() / edge_scores.sum().clamp(min=1e-30)),
                       node_share, edge_share)
