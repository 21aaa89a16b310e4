"""Exports to circuit-tracer's formats: a pruned attribution graph as the JSON its graph viewer (and
Neuronpedia-style tools) open, and a JumpReLU CLT as its cross-layer transcoder files.

The graph JSON has circuit-tracer's ``metadata``, ``qParams``, ``nodes`` and ``links`` with its node ids and
feature types. What does not fit a language model's graph, and how it is written:
- the prompt is an image: ``prompt_tokens`` name the ViT's tokens (``CLS``, ``patch r,c``), ``prompt`` says which
  image, CLT, token set and first replaced block;
- logits are zero-shot classes: a logit node's ``feature`` is the class index, its ``clerp`` the class name, and it
  sits at the CLS token (``ctx_idx`` 0), where the readout reads, not at the last position;
- embedding nodes have no vocabulary index: their id uses the token position twice;
- error nodes are the teacher's MLP outputs where the cascade keeps the teacher's MLP (see
  :mod:`.linearised`); where the CLT replaces it they are zero and pruned;
- ``scan`` names the CLT by its bundle name and the teacher: Neuronpedia hosts no scan of it, so features have no
  feature pages. Everything else the app knows is under a top-level ``clt_explorer`` key, which circuit-tracer's
  loaders ignore.

The transcoder files follow circuit-tracer's ``CrossLayerTranscoder.to_safetensors`` layout: per layer i,
``W_enc_{i}.safetensors`` (``W_enc_{i}`` [F, d] with the input scale folded in, ``b_enc_{i}``, ``b_dec_{i}``,
``threshold_{i}``) and ``W_dec_{i}.safetensors`` (``W_dec_{i}`` [F, L - i, d]). Its features read the MLP input
(ln_2's output, circuit-tracer's ``ln2.hook_normalized``), not ``hook_resid_mid``: pass that hook when loading.
Only JumpReLU maps: circuit-tracer reads a file without thresholds as ReLU, which a TopK CLT is not.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..storage import read_json, save_tensors, write_json
from .clt import CrossLayerTranscoder
from .graph import AttributionGraph
from .graph_pruning import PrunedGraph
from .tokens import CLS

FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "embedding": "embedding",
                 "logit": "logit"}
INPUT_HOOK, OUTPUT_HOOK = "ln2.hook_normalized", "hook_mlp_out"


def token_names(graph: AttributionGraph) -> list[str]:
    """CLS, then the patches by row and column."""
    columns = graph.grid[1]
    return [CLS.upper()] + [f"patch {i // columns},{i % columns}" for i in range(graph.n_tokens - 1)]


def node_record(graph: AttributionGraph, node: int, influence: float | None = None) -> dict:
    """One node in circuit-tracer's graph JSON (its ``Node`` fields), plus its kind under ``clt_explorer``."""
    L, T, n_f = graph.n_layers, graph.n_tokens, graph.n_features
    if node < n_f:
        layer, token, feature = (int(v) for v in graph.features[node])
        offset = 10 ** math.ceil(math.log10(graph.dictionary_size))  # circuit-tracer's ids unique across layers
        record = dict(node_id=f"{layer}_{feature}_{token}", feature=feature + offset * layer, layer=str(layer),
                      ctx_idx=token, feature_type=FEATURE_TYPES["feature"], jsNodeId=f"{layer}_{feature}-0",
                      activation=float(graph.activations[node]), kind="feature")
    elif node < n_f + L * T:
        layer, token = divmod(node - n_f, T)
        record = dict(node_id=f"0_{layer}_{token}", feature=-1, layer=str(layer), ctx_idx=token,
                      feature_type=FEATURE_TYPES["error"], jsNodeId=f"{layer}_{token}-0",
                      activation=float(graph.error_norms[layer, token]), kind="error")
    elif node < n_f + L * T + T:
        token = node - n_f - L * T
        record = dict(node_id=f"E_{token}_{token}", feature=token, layer="E", ctx_idx=token,
                      feature_type=FEATURE_TYPES["embedding"], jsNodeId=f"E_{token}-{token}", kind="embedding")
    else:
        i = node - (graph.n_nodes - len(graph.classes))
        c, p = graph.classes[i], float(graph.probabilities[i])
        record = dict(node_id=f"{L + 1}_{c}_0", feature=c, layer=str(L + 1), ctx_idx=0, feature_type="logit",
                      jsNodeId=f"L_{c}-0", token_prob=p, is_target_logit=i == 0,
                      clerp=f'Output "{graph.classnames[i]}" (p={p:.3f})', kind="logit")
    record.setdefault("clerp", "")
    record.setdefault("token_prob", 0.0)
    record.setdefault("is_target_logit", False)
    record.update(run_idx=0, reverse_ctx_idx=0, influence=influence)
    return record


def graph_json(graph: AttributionGraph, pruned: PrunedGraph, slug: str, scan: str, image_name: str,
               clt_name: str) -> dict:
    """The pruned graph in circuit-tracer's JSON graph format (see the module's docstring)."""
    kept = pruned.node_mask.nonzero()[:, 0].tolist()
    nodes = {node: node_record(graph, node, float(pruned.node_influence[node])) for node in kept}
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in nodes and t in nodes]
    prompt = (f"{image_name} · CLT {clt_name} replacing the {graph.tokens} tokens of blocks "
              f"{graph.start}..{graph.n_layers - 1}")
    return {
        "metadata": {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": token_names(graph),
                     "prompt": prompt, "node_threshold": pruned.node_threshold},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": [{k: v for k, v in record.items() if k != "kind"} for record in nodes.values()],
        "links": links,
        "clt_explorer": {"kinds": {r["node_id"]: r["kind"] for r in nodes.values()}, "clt": clt_name,
                         "tokens": graph.tokens, "start": graph.start, "grid": list(graph.grid),
                         "node_share": pruned.node_share, "edge_share": pruned.edge_share,
                         "edge_threshold": pruned.edge_threshold,
                         "classes": [{"index": c, "name": n} for c, n in zip(graph.classes, graph.classnames)]},
    }


def read_graph_json(path: str | Path) -> dict:
    """A graph JSON read back and checked: every link joins two nodes of the file."""
    data = read_json(path)
    for key in ("metadata", "qParams", "nodes", "links"):
        if key not in data:
            raise ValueError(f"{path} is not a circuit-tracer graph: it has no {key!r}")
    ids = {node["node_id"] for node in data["nodes"]}
    dangling = [link for link in data["links"] if link["source"] not in ids or link["target"] not in ids]
    if dangling:
        raise ValueError(f"{path}: {len(dangling)} links join nodes the file does not have, e.g. {dangling[0]}")
    return data


def export_transcoder(clt: CrossLayerTranscoder, folder: str | Path) -> list[Path]:
    """Write a JumpReLU CLT in circuit-tracer's cross-layer transcoder files (see the module's docstring); the
    paths written. TopK CLTs are refused: circuit-tracer would read them as ReLU CLTs without saying so."""
    sparsifier = clt.config.sparsifier
    if sparsifier != "jumprelu":
        raise ValueError(f"circuit-tracer's transcoders are ReLU or JumpReLU; a {sparsifier} CLT keeps the k largest "
                         f"codes per token, which its loader would read as ReLU (every positive code kept): only "
                         f"jumprelu CLTs are exported")
    folder = Path(folder)
    written = []
    with torch.no_grad():
        for layer in range(clt.config.n_layers):
            encoder = (clt.W_enc[layer].float() * float(clt.input_scale[layer])).T.contiguous()
            tensors = {f"W_enc_{layer}": encoder, f"b_enc_{layer}": clt.b_enc[layer].float(),
                       f"b_dec_{layer}": clt.b_dec[layer].float(),
                       f"threshold_{layer}": clt.sparsifier.threshold(layer).float()}
            for name, content in ((f"W_enc_{layer}.safetensors", tensors),
                                  (f"W_dec_{layer}.safetensors", {f"W_dec_{layer}": clt.W_dec[layer].float()})):
                save_tensors(folder / name, content)
                written.append(folder / name)
    write_json(folder / "circuit_tracer.json", {"feature_input_hook": INPUT_HOOK, "feature_output_hook": OUTPUT_HOOK,
                                                "n_layers": clt.config.n_layers, "d_model": clt.config.d_model,
                                                "d_transcoder": clt.config.n_features})
    return written + [folder / "circuit_tracer.json"]
