"""The Graph tab as plain data: one image's pruned attribution graph, what each node is and carries, and its
export in circuit-tracer's JSON format (:mod:`..model.graph`, :mod:`..model.graph_pruning`,
:mod:`..model.circuit_tracer`)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from PIL import Image

from ..model.circuit_tracer import graph_json, node_record, token_names
from ..model.graph import AttributionGraph, attribution_graph
from ..model.graph_pruning import PrunedGraph, prune
from .analysis import Explorer

NODE_SHARE, EDGE_SHARE = 0.8, 0.98
EDGES_PER_NODE = 5  # the strongest incoming and outgoing edges a node lists


@dataclass
class GraphEdge:
    source: int  # indices into ImageGraph.nodes
    target: int
    weight: float


@dataclass
class GraphNode:
    """A kept node: ``kind`` feature, error, embedding or logit; ``layer`` -1 for embeddings and L for logits;
    ``feature`` the CLT feature (features) or the class index (logits)."""

    node_id: str
    kind: str
    layer: int
    token: int
    token_name: str
    feature: int | None
    label: str
    activation: float | None
    influence: float


@dataclass
class ImageGraph:
    clt: str
    tokens: str
    start: int
    kept: list[int]
    classes: list[str]
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    n_nodes: int  # before pruning
    n_edges: int  # non-zero edges before pruning
    node_share: float
    edge_share: float
    node_threshold: float
    edge_threshold: float
    n_layers: int
    grid: tuple[int, int]
    patch_influence: list[float]  # per patch token, the influence of its kept nodes
    export: dict  # circuit-tracer's JSON graph
    seconds: float

    @functools.cached_property
    def _strongest(self) -> tuple[dict[int, list[GraphEdge]], dict[int, list[GraphEdge]]]:
        """Each node's edges in and out, strongest (by |weight|) first: one pass over the edges."""
        incoming: dict[int, list[GraphEdge]] = {}
        outgoing: dict[int, list[GraphEdge]] = {}
        for edge in sorted(self.edges, key=lambda e: -abs(e.weight)):
            incoming.setdefault(edge.target, []).append(edge)
            outgoing.setdefault(edge.source, []).append(edge)
        return incoming, outgoing

    def incoming(self, node: int) -> list[GraphEdge]:
        """The strongest edges into ``node`` by |weight|."""
        return self._strongest[0].get(node, [])[:EDGES_PER_NODE]

    def outgoing(self, node: int) -> list[GraphEdge]:
        """The strongest edges out of ``node`` by |weight|."""
        return self._strongest[1].get(node, [])[:EDGES_PER_NODE]


def _nodes(graph: AttributionGraph, pruned: PrunedGraph) -> tuple[list[int], list[GraphNode]]:
    names = token_names(graph)
    kept = pruned.node_mask.nonzero()[:, 0].tolist()
    nodes = []
    for node in kept:
        record = node_record(graph, node)
        kind, token = record["kind"], record["ctx_idx"]
        layer = -1 if kind == "embedding" else graph.n_layers if kind == "logit" else int(record["layer"])
        feature = int(graph.features[node, 2]) if kind == "feature" else record["feature"] if kind == "logit" else None
        label = {"feature": f"feature {layer}:{feature} @ {names[token]}", "error": f"error {layer} @ {names[token]}",
                 "embedding": f"embedding @ {names[token]}", "logit": record["clerp"]}[kind]
        nodes.append(GraphNode(record["node_id"], kind, layer, token, names[token], feature, label,
                               record.get("activation"), float(pruned.node_influence[node])))
    return kept, nodes


@torch.no_grad()
def attribution_of(explorer: Explorer, image: Image.Image, clt: str, tokens: str, start: int = 0,
                   kept_sources: list[int] | None = None, classes: list[str] | None = None) -> AttributionGraph:
    """The attribution graph of ``image`` in the replacement the Explore tab chose, towards ``classes`` (names;
    default the replaced model's top-1): the model passes (on a Space, what runs on its GPU)."""
    explorer.check(clt, tokens, start)
    kept = explorer.kept_or_all(kept_sources)
    names = explorer.classifier.classnames
    unknown = [c for c in classes or [] if c not in names]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; this bundle's classes are e.g. {names[:5]}")
    indices = [names.index(c) for c in classes] if classes else None
    return attribution_graph(explorer.teacher, explorer.clt(clt), explorer.classifier, explorer.pixels(image),
                             start, tokens, explorer.term_weights(kept), indices)


def pruned_graph(explorer: Explorer, graph: AttributionGraph, clt: str, kept_sources: list[int] | None = None,
                 node_share: float = NODE_SHARE, edge_share: float = EDGE_SHARE,
                 image_name: str = "image") -> ImageGraph:
    """What the Graph tab shows of ``graph``: pruned to ``node_share`` / ``edge_share`` of the influence, its kept
    nodes and edges, the influence per patch, and the export."""
    began = time.perf_counter()
    pruned = prune(graph, node_share, edge_share)
    kept_nodes, nodes = _nodes(graph, pruned)
    position = {node: i for i, node in enumerate(kept_nodes)}
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    edges = [GraphEdge(position[s], position[t], float(graph.adjacency[t, s]))
             for t, s in zip(targets.tolist(), sources.tolist())]
    patch_influence = [0.0] * (graph.n_tokens - 1)
    for node in nodes:
        if node.token > 0 and node.kind != "logit":
            patch_influence[node.token - 1] += node.influence
    export = graph_json(graph, pruned, f"{explorer.bundle.name}-{clt}-{image_name}", f"{explorer.bundle.name}/{clt}",
                        image_name, clt)
    return ImageGraph(clt, graph.tokens, graph.start, explorer.kept_or_all(kept_sources), graph.classnames, nodes,
                      edges, graph.n_nodes, int((graph.adjacency != 0).sum()), pruned.node_share, pruned.edge_share,
                      node_share, edge_share, graph.n_layers, graph.grid, patch_influence, export,
                      graph.seconds + time.perf_counter() - began)


def image_graph(explorer: Explorer, image: Image.Image, clt: str, tokens: str, start: int = 0,
                kept_sources: list[int] | None = None, classes: list[str] | None = None,
                node_share: float = NODE_SHARE, edge_share: float = EDGE_SHARE,
                image_name: str = "image") -> ImageGraph:
    """:func:`attribution_of` then :func:`pruned_graph`: the Graph tab's content for ``image``."""
    graph = attribution_of(explorer, image, clt, tokens, start, kept_sources, classes)
    return pruned_graph(explorer, graph, clt, kept_sources, node_share, edge_share, image_name)
