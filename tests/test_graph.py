"""Attribution graphs: the linearised model against the real replaced pass, edges against pre-activations, total
effects computed two ways, the direct attribution as a special case, pruning, the circuit-tracer exports, and the
Graph tab (its API and a browser)."""

import json

import pytest
import torch
from conftest import ARTIFACTS, page_with_example, random_clt, random_pixels
from gradio_client import handle_file
from PIL import Image
from safetensors.torch import load_file
from test_app import named

from clt_explorer.app import features
from clt_explorer.app.graph import image_graph
from clt_explorer.model.circuit_tracer import export_transcoder, graph_json, read_graph_json
from clt_explorer.model.graph import attribution_graph, total_effects, total_effects_from_adjacency
from clt_explorer.model.graph_pruning import influence, normalised_adjacency, prune, shares_threshold
from clt_explorer.model.linearised import LinearisedReplacement
from clt_explorer.model.zeroshot import ZeroShotClassifier
from clt_explorer.storage import write_json


@pytest.fixture(scope="module")
def classifier(random_teacher):
    return ZeroShotClassifier.build(random_teacher, [f"class {i}" for i in range(10)], ["a photo of a {}."])


@pytest.fixture(scope="module")
def image(explorer):
    return Image.open(explorer.examples()[2]).convert("RGB")


def feature_and_logit_rows(graph):
    return torch.cat([torch.arange(graph.n_features), torch.arange(graph.n_nodes - len(graph.classes), graph.n_nodes)])


@pytest.mark.parametrize("sparsifier", ["relu_topk", "abs_topk", "jumprelu"])
@pytest.mark.parametrize("tokens,start", [("cls", 0), ("all", 2), ("patches", 1)])
def test_the_linearised_model_is_the_replaced_pass_and_edges_sum_to_pre_activations(random_teacher, classifier,
                                                                                    sparsifier, tokens, start):
    teacher, pixels = random_teacher, random_pixels(random_teacher, 1)
    clt = random_clt(teacher, 2, sparsifier, 8, seed=1)
    weights = torch.ones(teacher.n_layers, teacher.n_layers)
    weights[-1, 1] = 0.0  # the final layer drops source 1's term
    surrogate = clt.surrogate(term_weights=weights)
    with teacher.replace_mlps(surrogate, start, tokens):
        _, final_cls = teacher.encode_with_final(pixels)
    model = LinearisedReplacement(teacher, clt, pixels, start, tokens, weights)
    assert torch.allclose(model.final_cls, final_cls[0], atol=1e-5)
    for real, frozen in zip(surrogate.codes, model.codes):
        assert torch.allclose(real.dense()[0], frozen.dense(), atol=1e-5)
    xs, final = model.forward(model.embeddings, model.errors, model.values)  # frozen model at its operating point
    assert torch.allclose(final, final_cls[0], atol=1e-5) and torch.allclose(torch.stack(xs), model.xs, atol=1e-5)

    graph = attribution_graph(teacher, clt, classifier, pixels, start, tokens, weights, classes=[3, 7])
    rows = feature_and_logit_rows(graph)
    for layer, codes in enumerate(model.codes):  # the targets are the encoder's own pre-activations
        pre = clt.preactivations(layer, model.xs[layer][model.index])
        mine = graph.features[:, 0] == layer
        assert torch.allclose(graph.target_values[:graph.n_features][mine],
                              pre[graph.features[mine, 1] - (model.index.start or 0), graph.features[mine, 2]],
                              atol=1e-5)
    total = graph.adjacency[rows].sum(1) + graph.bias[rows] + graph.untraced[rows]
    assert (total - graph.target_values[rows]).abs().max() < 1e-5
    assert graph.untraced.abs().max() == 0  # every feature traced
    assert graph.adjacency[graph.n_features:graph.logit_node(0)].abs().max() == 0  # errors and embeddings: no inputs
    logits = classifier.logits(teacher.readout(final_cls))[0]
    assert torch.allclose(graph.target_values[-2:], logits[[3, 7]], atol=1e-4)


@pytest.mark.parametrize("tokens,start", [("cls", 0), ("all", 1)])
def test_total_effects_from_one_backward_pass_equal_those_solved_from_the_adjacency(random_teacher, classifier,
                                                                                   tokens, start):
    teacher, pixels = random_teacher, random_pixels(random_teacher, 1, seed=3)
    clt = random_clt(teacher, 2, "abs_topk", 8, seed=2)
    graph = attribution_graph(teacher, clt, classifier, pixels, start, tokens)
    model = LinearisedReplacement(teacher, clt, pixels, start, tokens)
    gradient = torch.func.jacrev(lambda x: classifier.logits(teacher.readout(x[None]))[0])(model.final_cls)
    live = torch.cat([e.flatten() for e in total_effects(model, gradient[graph.classes[0]])])
    live = live[torch.cat([v.flatten() for v in model.values]) != 0]
    solved = total_effects_from_adjacency(graph)
    assert torch.allclose(live, solved, atol=1e-5 * live.abs().max())
    direct = graph.adjacency[graph.logit_node(0), :graph.n_features]
    assert not torch.allclose(solved, direct, atol=1e-3 * solved.abs().max())  # indirect paths are counted


def test_with_the_last_block_replaced_logit_edges_and_total_effects_are_the_direct_attribution(explorer, image):
    last = explorer.n_layers - 1
    for name in explorer.clt_names:
        ranked = features.image_features(explorer, image, name, "cls", last, per_layer=50, max_cls_rate=None)
        graph = attribution_graph(explorer.teacher, explorer.clt(name), explorer.classifier, explorer.pixels(image),
                                  last, "cls")
        edges = graph.adjacency[graph.logit_node(0), :graph.n_features]
        by_feature = {(int(f[0]), int(f[2])): float(e) for f, e in zip(graph.features, edges)}
        for layer, rows in enumerate(ranked.layers):  # the top 50 of each layer's active features
            assert len(rows) == min(50, int((graph.features[:, 0] == layer).sum()))
        for row in (row for rows in ranked.layers for row in rows):
            assert by_feature[row.layer, row.feature] == pytest.approx(row.attribution, rel=1e-4, abs=1e-6)
        total = features.image_features(explorer, image, name, "cls", last, per_layer=50, max_cls_rate=None,
                                        ranking="total")
        assert [[(r.feature, round(r.attribution, 4)) for r in rows] for rows in total.layers] == \
               [[(r.feature, round(r.attribution, 4)) for r in rows] for rows in ranked.layers]


def test_a_capped_graph_traces_the_largest_total_effects_and_keeps_the_rest_apart(random_teacher, classifier):
    teacher, pixels = random_teacher, random_pixels(random_teacher, 1, seed=5)
    clt = random_clt(teacher, 2, "relu_topk", 8, seed=3)
    full = attribution_graph(teacher, clt, classifier, pixels, 0, "all")
    capped = attribution_graph(teacher, clt, classifier, pixels, 0, "all", max_feature_nodes=40)
    assert capped.n_features == 40 and full.n_features > 40
    rows = feature_and_logit_rows(capped)
    total = capped.adjacency[rows].sum(1) + capped.bias[rows] + capped.untraced[rows]
    assert (total - capped.target_values[rows]).abs().max() < 1e-5 and capped.untraced.abs().max() > 0
    effects = total_effects_from_adjacency(full).abs()
    chosen = {tuple(f.tolist()) for f in capped.features}
    ranked = [tuple(full.features[i].tolist()) for i in effects.argsort(descending=True)]
    assert chosen == set(ranked[:40])


def test_influence_is_the_series_of_the_normalised_adjacency_and_pruning_keeps_its_share(random_teacher, classifier):
    teacher, pixels = random_teacher, random_pixels(random_teacher, 1, seed=7)
    graph = attribution_graph(teacher, random_clt(teacher, 2, "jumprelu", 8, seed=4), classifier, pixels, 0, "all")
    A, w = normalised_adjacency(graph.adjacency), graph.logit_weights
    closed = torch.linalg.solve((torch.eye(graph.n_nodes) - A).T.double(), w.double()) - w.double()
    assert torch.allclose(influence(A, w).double(), closed, atol=1e-6)
    for share in (0.8, 0.95):
        pruned = prune(graph, share, 0.98)
        prunable = torch.zeros(graph.n_nodes, dtype=torch.bool)
        prunable[:graph.embedding_node(0)] = True
        kept = float(closed[prunable & pruned.node_mask].sum() / closed[prunable].sum())
        assert pruned.node_share == pytest.approx(kept, rel=1e-4) and kept >= share
        assert pruned.node_mask[graph.embedding_node(0):].all()  # embeddings and logits always kept
        assert not pruned.edge_mask[~pruned.node_mask].any() and not pruned.edge_mask[:, ~pruned.node_mask].any()
        assert pruned.edge_share >= 0.98 - 1e-6
    assert prune(graph, 0.8).node_mask.sum() < prune(graph, 0.95).node_mask.sum()
    scores = torch.tensor([5.0, 1.0, 3.0, 1.0])
    assert shares_threshold(scores, 0.5) == 5.0 and shares_threshold(scores, 0.6) == 3.0
    assert shares_threshold(scores, 1.0) == 1.0
    with pytest.raises(ValueError, match="node_share must be in"):
        prune(graph, 1.5)


def test_an_exported_graph_reads_back_with_its_edges(explorer, image, tmp_path):
    graph = attribution_graph(explorer.teacher, explorer.clt("jumprelu"), explorer.classifier, explorer.pixels(image),
                              0, "all")
    pruned = prune(graph)
    data = graph_json(graph, pruned, "slug", "demo/jumprelu", "an image", "jumprelu")
    write_json(tmp_path / "graph.json", data)
    back = read_graph_json(tmp_path / "graph.json")
    ids = [n["node_id"] for n in back["nodes"]]
    assert len(ids) == len(set(ids)) == int(pruned.node_mask.sum())
    index = {node_id: i for i, node_id in zip(pruned.node_mask.nonzero()[:, 0].tolist(), ids)}
    assert len(back["links"]) == int(pruned.edge_mask.sum())
    for link in back["links"]:
        assert link["weight"] == pytest.approx(float(graph.adjacency[index[link["target"]], index[link["source"]]]))
    kinds = back["clt_explorer"]["kinds"]
    features_kept = [n for n in back["nodes"] if kinds[n["node_id"]] == "feature"]
    layer, feature, token = (int(v) for v in features_kept[0]["node_id"].split("_"))
    assert features_kept[0]["feature_type"] == "cross layer transcoder" and features_kept[0]["ctx_idx"] == token
    assert [n for n in back["nodes"] if n["feature_type"] == "logit"][0]["is_target_logit"]
    assert back["metadata"]["prompt_tokens"][:2] == ["CLS", "patch 0,0"]
    broken = dict(back, links=back["links"] + [{"source": "nowhere", "target": ids[0], "weight": 1.0}])
    write_json(tmp_path / "broken.json", broken)
    with pytest.raises(ValueError, match="links join nodes the file does not have"):
        read_graph_json(tmp_path / "broken.json")
    write_json(tmp_path / "other.json", {"nodes": []})
    with pytest.raises(ValueError, match="not a circuit-tracer graph"):
        read_graph_json(tmp_path / "other.json")


def test_a_jumprelu_clt_exports_to_circuit_tracers_transcoder_files_and_topk_is_refused(random_teacher, tmp_path):
    teacher, pixels = random_teacher, random_pixels(random_teacher, 2)
    clt = random_clt(teacher, 2, "jumprelu", 8, seed=6)
    with torch.no_grad():
        clt.input_scale.copy_(torch.linspace(0.5, 2.0, teacher.n_layers))
    export_transcoder(clt, tmp_path / "ct")
    xs = teacher.capture(pixels).xs  # [L, B, T, d]
    codes, yhat = clt.encode(xs), clt.decode(clt.encode(xs))
    L = teacher.n_layers
    decoded = torch.zeros_like(yhat) + torch.stack([load_file(tmp_path / "ct" / f"W_enc_{i}.safetensors")[f"b_dec_{i}"]
                                                    for i in range(L)])[:, None, None]
    for i in range(L):  # circuit-tracer's arithmetic: einsum with W_enc [F, d], features > threshold
        enc = load_file(tmp_path / "ct" / f"W_enc_{i}.safetensors")
        pre = torch.einsum("btd,fd->btf", xs[i], enc[f"W_enc_{i}"]) + enc[f"b_enc_{i}"]
        z = pre * (pre > enc[f"threshold_{i}"])
        assert torch.allclose(z, codes[i], atol=1e-5)
        W_dec = load_file(tmp_path / "ct" / f"W_dec_{i}.safetensors")[f"W_dec_{i}"]  # [F, L - i, d]
        decoded[i:] += torch.einsum("btf,fld->lbtd", z, W_dec)
    assert torch.allclose(decoded, yhat, atol=1e-5)
    with pytest.raises(ValueError, match="only jumprelu CLTs are exported"):
        export_transcoder(random_clt(teacher, 2, "relu_topk", 8, seed=0), tmp_path / "topk")


def test_the_graph_and_total_ranking_apis_match_the_library(client, explorer, image):
    path = handle_file(str(explorer.examples()[2]))
    kept = list(range(explorer.n_layers))
    out = named(client, "/graph", client.predict(path, "abs_topk", "cls", 0, kept, [], 0.8, 0.98, api_name="/graph"))
    graph = image_graph(explorer, image, "abs_topk", "cls", 0, kept, image_name=explorer.examples()[2].stem)
    with open(out["The graph in circuit-tracer's JSON format"]) as f:
        served = json.load(f)
    assert served["nodes"] == graph.export["nodes"] and served["links"] == graph.export["links"]
    assert f"{len(graph.nodes)} of {graph.n_nodes} nodes" in out["Graph summary"]
    named_classes = client.predict(path, "abs_topk", "cls", 0, kept, explorer.classifier.classnames[:2], 0.9, 0.98,
                                   api_name="/graph")
    with open(named(client, "/graph", named_classes)["The graph in circuit-tracer's JSON format"]) as f:
        logits = [n for n in json.load(f)["nodes"] if n["feature_type"] == "logit"]
    assert [n["feature"] for n in logits] == [0, 1]
    with pytest.raises(Exception, match="unknown classes"):
        client.predict(path, "abs_topk", "cls", 0, kept, ["no such class"], 0.8, 0.98, api_name="/graph")
    ranked = named(client, "/features", client.predict(path, "relu_topk", "cls", 0, kept, 100, 3, "total",
                                                       api_name="/features"))
    total = features.image_features(explorer, image, "relu_topk", "cls", 0, kept, 3, None, "total")
    assert f"Total effect on **{total.predicted}**" in ranked["Features summary"]


@pytest.mark.browser
def test_browser_builds_a_graph_and_a_clicked_node_opens_its_feature_card(app_url, explorer):
    from playwright.sync_api import expect

    with page_with_example(app_url, explorer, 2, {"width": 1400, "height": 1600}) as page:
        page.get_by_role("tab", name="Graph").click()
        expect(page.locator("#graph_summary")).to_contain_text("nodes and", timeout=60_000)
        point = page.locator("#graph_plot .scatterlayer .trace").filter(
            has=page.locator("path.point")).first.locator("path.point").first
        expect(point).to_be_visible()
        page.wait_for_timeout(500)  # the click handler binds to a new plot within 300 ms
        box = point.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        expect(page.locator("#graph_plot .hoverlayer")).to_contain_text("influence", timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "graph.png"), full_page=True)
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        expect(page.locator("#feature_card")).to_contain_text("Feature ", timeout=30_000)
        expect(page.locator("#feature_top img").first).to_be_visible()
        assert page.locator("#feature_id input, #feature_id textarea").first.input_value().count(":") == 1
