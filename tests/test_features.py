"""The feature drill-down: the statistics store against a brute-force recomputation, the readout's linearisation,
the attribution against ablation, interventions through the surrogate, and the Features tab in the app."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARTIFACTS, page_with_example, random_pixels
from gradio_client import handle_file
from PIL import Image
from test_app import named

from clt_explorer.app import features
from clt_explorer.app.analysis import top_predictions
from clt_explorer.data import image_batches, load_dataset
from clt_explorer.model.attribution import reach, readout_gradient, residual_directions
from clt_explorer.model.sparsifiers import SparseCodes
from clt_explorer.model.tokens import PATCHES, token_index
from clt_explorer.model.zeroshot import ZeroShotClassifier
from clt_explorer.retrieval.features import FeatureStatistics, FeatureStore, quantize_maps
from clt_explorer.storage import AssetError, read_json, write_json


@pytest.fixture(scope="module")
def corpus(tiny_bundle):
    """The bundle's retrieval corpus: (dataset, thumbnail row -> dataset index)."""
    dataset = load_dataset("synthetic", tiny_bundle.manifest["dataset"]["train_split"],
                           **tiny_bundle.manifest["dataset"]["options"])
    return dataset, tiny_bundle.load_thumbnails().dataset_indices


def brute_force(teacher, clt, dataset, indices):
    """Every image's codes at once per layer, then the statistics over the whole corpus (no streaming merge)."""
    per_layer = [[] for _ in range(clt.config.n_layers)]
    with torch.no_grad():
        for pixels, _, _ in image_batches(dataset, teacher.preprocess, 500, indices):
            for layer, codes in enumerate(clt.encode_sparse(teacher.capture(pixels).xs)):
                per_layer[layer].append(codes.dense().float())
    return [torch.cat(z) for z in per_layer]  # [N, T, F] per layer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["abs_topk", "jumprelu"])
def test_the_stored_statistics_equal_a_brute_force_recomputation(tiny_bundle, explorer, corpus, name):
    dataset, indices = corpus
    store = explorer.feature_store(name)
    assert store.n_images == len(indices) and store.top_n == 16
    codes = brute_force(explorer.teacher, explorer.clt(name), dataset, indices)
    for layer, z in enumerate(codes):
        active = z != 0
        expected = {"token_rate": active.float().mean((0, 1)), "image_rate": active.any(1).float().mean(0),
                    "cls_rate": active[:, 0].float().mean(0), "max_abs": z.abs().amax((0, 1)),
                    "mean": z.sum((0, 1)) / active.sum((0, 1)).clamp_min(1)}
        for stat, values in expected.items():
            assert torch.allclose(store.stat(stat, layer), values, atol=1e-5), (layer, stat)
        peak_abs, where = z.abs().max(1)  # [N, F]
        peaks = z.gather(1, where[:, None]).squeeze(1)
        for feature in range(0, z.shape[-1], 7):
            top = store.top_images(layer, feature)
            firing = int((peak_abs[:, feature] > 0).sum())
            assert len(top.ids) == min(16, firing)
            best = peak_abs[:, feature].topk(len(top.ids))
            assert torch.allclose(torch.tensor(top.peaks).abs(), best.values, atol=1e-6)
            assert sorted(top.ids) == sorted(best.indices.tolist())  # no ties among float activations
            assert torch.allclose(torch.tensor(top.peaks), peaks[top.ids, feature], atol=1e-6)
            exact = z[top.ids, 1:, feature]
            step = exact.abs().amax(-1, keepdim=True) / 127
            assert (top.maps - exact).abs().le(step / 2 + 1e-6).all()  # 8 bits with one scale per map


def test_quantized_maps_are_within_half_a_step_and_keep_their_peak():
    maps = torch.randn(50, 49) * torch.rand(50, 1) * 10
    maps[3] = 0
    q, scale = quantize_maps(maps)
    assert q.dtype == torch.int8 and torch.equal(q[3], torch.zeros(49, dtype=torch.int8))
    assert ((q.float() * scale[:, None]) - maps).abs().le(scale[:, None] / 2 + 1e-6).all()
    assert torch.allclose((q.float() * scale[:, None]).abs().amax(-1), maps.abs().amax(-1))


def test_streamed_top_images_do_not_depend_on_the_batching():
    torch.manual_seed(0)
    z = torch.randn(40, 5, 30) * (torch.rand(40, 5, 30) < 0.2)
    stores = []
    for batch in (40, 7):
        statistics = FeatureStatistics(1, 30, 4, 8, top_n=6)
        for i in range(0, 40, batch):
            statistics.add([SparseCodes.from_dense(z[i:i + batch])], torch.ones(len(z[i:i + batch]), 8))
        stores.append(statistics)
    one, many = stores
    assert torch.equal(one.top_ids, many.top_ids) and torch.equal(one.maps, many.maps)
    assert torch.equal(one.token_count, many.token_count) and one.n_images == many.n_images == 40


def test_a_store_of_another_version_or_shape_is_refused(tiny_bundle, tmp_path):
    folder = tmp_path / "features"
    shutil.copytree(tiny_bundle.features_dir("relu_topk"), folder)
    meta = read_json(folder / "meta.json")
    with pytest.raises(AssetError, match="n_images is .*expected 7"):
        FeatureStore(folder, n_images=7)
    write_json(folder / "meta.json", {**meta, "version": 0})
    assert not FeatureStore.exists(folder)
    with pytest.raises(AssetError, match="version 0"):
        FeatureStore(folder)


def test_the_readout_gradient_is_the_finite_difference_of_the_readout(random_teacher):
    torch.manual_seed(1)
    weights = torch.nn.functional.normalize(torch.randn(1, 3, random_teacher.model.visual.output_dim), dim=-1)
    classifier = ZeroShotClassifier(["a", "b", "c"], ["{}"], weights, 100.0)
    point = random_teacher.capture(random_pixels(random_teacher, 1)).final_cls[0]
    gradient = readout_gradient(random_teacher, classifier, point)
    for _ in range(3):
        direction = torch.randn_like(point) * point.norm() * 1e-3
        with torch.no_grad():
            plus = classifier.logits(random_teacher.readout((point + direction)[None]))[0]
            minus = classifier.logits(random_teacher.readout((point - direction)[None]))[0]
        assert torch.allclose((plus - minus) / 2, gradient @ direction, rtol=1e-3, atol=1e-5)


def test_reach_is_the_norm_of_the_decoder_rows(explorer):
    clt = explorer.clt("relu_topk")
    assert torch.allclose(reach(clt, 1, 17), clt.W_dec[1][17].detach().norm(dim=-1))
    assert len(reach(clt, explorer.n_layers - 1, 0)) == 1
    with pytest.raises(ValueError, match="feature 9:0 does not exist"):
        reach(clt, 9, 0)


@pytest.fixture(scope="module")
def image(explorer):
    return Image.open(explorer.examples()[2]).convert("RGB")


@pytest.mark.parametrize("name", ["relu_topk", "abs_topk"])
def test_attribution_at_the_last_block_predicts_the_ablation(explorer, image, name):
    """At start = L-1 (CLS) an ablation changes only the last block's CLS output: the logit drop is the attribution
    up to the readout's linearisation."""
    last = explorer.n_layers - 1
    result = features.image_features(explorer, image, name, "cls", last, max_cls_rate=None)
    checked = 0
    for rows in result.layers:
        row = rows[0]
        drop = -features.intervene(explorer, image, name, {(row.layer, row.feature): 0.0}, "cls", last).logit_change
        assert drop == pytest.approx(row.attribution, rel=0.15, abs=1e-4), row
        checked += 1
    assert checked == explorer.n_layers


@pytest.mark.slow
def test_the_attribution_script_finds_top_features_that_matter_more_than_random_ones(tiny_bundle, tmp_path):
    script = Path(__file__).parent.parent / "scripts" / "feature_attribution.py"
    done = subprocess.run([sys.executable, str(script), "--bundle", str(tiny_bundle.root), "--clt", "relu_topk",
                           "--max-images", "6", "--starts", "last", "--out", str(tmp_path / "records.csv")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [overall] = json.loads(done.stdout.strip().splitlines()[-1])["overall"]
    assert overall["cases"] == 6 * 4 and overall["start"] == 3  # every layer of the tiny CLIP has 5 active codes
    assert overall["mean drop, direct"] > overall["mean drop, random"] and overall["direct > random"] >= 0.75
    assert overall["mean drop, total"] == pytest.approx(overall["mean drop, direct"], rel=1e-3)  # equal at L-1
    assert len((tmp_path / "records.csv").read_text().splitlines()) == 1 + 6 * 4


def test_the_patch_map_of_a_feature_is_its_code_in_the_teachers_pass(explorer, image):
    result = features.image_features(explorer, image, "jumprelu", "all", 0, per_layer=3)
    pixels = explorer.teacher.preprocess_images([image])
    codes = explorer.clt("jumprelu").encode_sparse(explorer.teacher.capture(pixels).xs)
    for rows in result.layers:
        for row in rows:
            z = codes[row.layer].take_tokens(token_index(PATCHES)).dense()[0, :, row.feature]
            assert torch.allclose(torch.tensor(row.patch_map), z)
            assert row.cls_rate <= features.DEFAULT_MAX_CLS_RATE * (1 + 1e-6)  # always-on hidden (float32 rates)


def test_scale_one_and_inactive_features_change_nothing_and_ablating_a_layer_zeroes_it(explorer, image):
    name, start = "abs_topk", 1
    pixels = explorer.teacher.preprocess_images([image])
    kept = list(range(explorer.n_layers))
    plain = explorer.replaced_pass(pixels, name, "all", start, kept)
    n_features = explorer.clt(name).config.n_features
    ones = explorer.replaced_pass(pixels, name, "all", start, kept, {(2, f): 1.0 for f in range(0, n_features, 3)})
    assert torch.equal(plain.logits, ones.logits)
    active = {s: set(c.indices[c.values != 0].tolist()) for s, c in enumerate(plain.codes)}
    inactive = [f for f in range(n_features) if f not in active[2]][:20]
    assert torch.equal(plain.logits, explorer.replaced_pass(pixels, name, "all", start, kept,
                                                            {(2, f): 0.0 for f in inactive}).logits)
    ablated = explorer.replaced_pass(pixels, name, "all", start, kept, {(2, f): 0.0 for f in active[2]})
    weights = torch.ones(explorer.n_layers, explorer.n_layers)
    weights[:, 2] = 0.0  # no term of source 2 in any target: z_2 = 0
    clt = explorer.clt(name)
    with explorer.teacher.replace_mlps(clt.surrogate(term_weights=weights), start, "all"):
        zeroed = explorer.classifier.logits(explorer.teacher.encode_images(pixels))
    assert torch.allclose(ablated.logits, zeroed, atol=1e-5)
    assert not torch.allclose(ablated.logits, plain.logits, atol=1e-3)


def test_an_intervention_resumed_at_the_first_replaced_block_equals_the_whole_passes(explorer, image):
    """An intervention's edited and plain passes both resume from the teacher's pass at ``start``: the same as
    running them from the pixels, with an edit below ``start`` and one above it."""
    name, start, scales = "abs_topk", 2, {(1, 4): 0.0, (3, 7): -2.0}
    found = features.intervene(explorer, image, name, scales, "all", start)
    pixels, kept = explorer.pixels(image), list(range(explorer.n_layers))
    edited = explorer.replaced_pass(pixels, name, "all", start, kept, scales).logits
    replaced = explorer.replaced_pass(pixels, name, "all", start, kept).logits
    teacher = explorer.classifier.logits(explorer.teacher.encode_images(pixels))
    names = explorer.classifier.classnames
    for mine, logits in ((found.edited, edited), (found.replaced, replaced), (found.teacher, teacher)):
        theirs = top_predictions(logits[0], names)
        assert [p.classname for p in mine] == [p.classname for p in theirs]
        assert [p.probability for p in mine] == pytest.approx([p.probability for p in theirs], abs=1e-5)
    top1 = int(replaced[0].argmax())
    assert found.logit_change == pytest.approx(float(edited[0, top1] - replaced[0, top1]), abs=1e-4)
    card = features.feature_card(explorer, name, 3, 7, image, "all", start)  # linearised at the resumed pass
    effect = readout_gradient(explorer.teacher, explorer.classifier, explorer.replaced_pass(
        pixels, name, "all", start, kept).final_cls[0]) @ residual_directions(
        explorer.clt(name), explorer.teacher, 3, torch.tensor([7]), start, None)[0]
    assert card.towards[0].effect == pytest.approx(float(effect.max()), rel=1e-4, abs=1e-6)


def test_feature_cards_read_the_store_and_refuse_what_does_not_exist(explorer, image):
    card = features.feature_card(explorer, "relu_topk", 2, 5, image, "cls", 0)
    top = explorer.feature_store("relu_topk").top_images(2, 5)
    assert [t.thumbnail_id for t in card.top_images] == top.ids and card.linearised_at == "this image"
    assert [t.classname for t in card.top_images] == [explorer.classifier.classnames[explorer.thumbnails.labels[i]]
                                                      for i in top.ids]
    assert len(card.reach) == explorer.n_layers - 2 and len(card.towards) == len(card.away) == 5
    assert card.towards[0].effect >= card.towards[-1].effect >= card.away[-1].effect >= card.away[0].effect
    blind = features.feature_card(explorer, "relu_topk", 2, 5)
    assert blind.linearised_at.startswith("the training images' mean") and blind.image_map is None
    with pytest.raises(ValueError, match="feature 2:99999 does not exist"):
        features.feature_card(explorer, "relu_topk", 2, 99999)
    with pytest.raises(ValueError, match="layer:feature, e.g. 3:417"):
        features.parse_feature("three")
    with pytest.raises(ValueError, match="through the CLS token"):
        features.image_features(explorer, image, "relu_topk", "patches")


def test_the_features_api_matches_the_library(client, explorer, image):
    path = handle_file(str(explorer.examples()[2]))
    kept = list(range(explorer.n_layers))
    out = client.predict(path, "relu_topk", "cls", 1, kept, 10, 3, api_name="/features")
    direct = features.image_features(explorer, image, "relu_topk", "cls", 1, kept, 3, 0.10)
    assert direct.predicted in named(client, "/features", out)["Features summary"]
    card = named(client, "/feature_card", client.predict(path, "relu_topk", "2:5", "cls", 1, kept, 0.0,
                                                         api_name="/feature_card"))
    edited = features.intervene(explorer, image, "relu_topk", {(2, 5): 0.0}, "cls", 1)
    got = {c["label"]: c["confidence"] for c in card["With the feature scaled"]["confidences"]}
    assert got == pytest.approx({p.classname: p.probability for p in edited.edited}, abs=1e-6)
    assert "Feature 2:5 of relu_topk" in card["Feature card"]
    with pytest.raises(Exception, match="layer:feature"):
        client.predict(path, "relu_topk", "2-5", "cls", 1, kept, 1.0, api_name="/feature_card")


@pytest.mark.browser
def test_browser_opens_a_feature_card_and_the_slider_changes_the_predictions(app_url, explorer):
    from playwright.sync_api import expect

    with page_with_example(app_url, explorer, 2, {"width": 1400, "height": 1800}) as page:
        page.get_by_role("tab", name="Features").click()
        last = explorer.n_layers - 1
        expect(page.locator(f"#features_{last} img").first).to_be_visible(timeout=60_000)
        expect(page.locator("#features_summary")).to_contain_text("Attribution to")
        page.locator(f"#features_{last} img").first.click()  # opens the card of the layer's top feature
        expect(page.locator("#feature_card")).to_contain_text(f"Feature {last}:", timeout=30_000)
        expect(page.locator("#feature_top img").first).to_be_visible()
        expect(page.locator("#feature_reach .js-plotly-plot")).to_be_visible()
        expect(page.locator("#feature_classes .js-plotly-plot")).to_be_visible()
        expect(page.locator("#intervention_summary")).to_contain_text("scaled ×1")
        before = page.locator("#feature_edited").inner_text()
        number = page.locator("#feature_scale input[type=number]")
        number.fill("20")
        number.press("Enter")
        expect(page.locator("#intervention_summary")).to_contain_text("scaled ×20", timeout=30_000)
        assert page.locator("#feature_edited").inner_text() != before
        page.screenshot(path=str(ARTIFACTS / "features.png"), full_page=True)
