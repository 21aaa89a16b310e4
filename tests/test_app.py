"""The running app, driven through gradio_client and through a real browser (Playwright + Debian chromium)."""

from pathlib import Path

import numpy as np
import pytest
from conftest import ARTIFACTS, chromium
from gradio_client import handle_file
from PIL import Image


def named(client, api_name, outputs):
    """An endpoint's outputs keyed by their components' labels (the API's own description of its returns)."""
    returns = client.view_api(return_format="dict", print_info=False)["named_endpoints"][api_name]["returns"]
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    assert len(returns) == len(outputs)
    return {r["label"]: value for r, value in zip(returns, outputs)}


def analyze(client, path, clt="relu_topk", tokens="all", start=1, target=3, top_k=3, heatmap="cls",
            kept=(0, 1, 2, 3)):
    outputs = client.predict(handle_file(str(path)), clt, tokens, start, target, top_k, heatmap, list(kept),
                             api_name="/analyze")
    return named(client, "/analyze", outputs)


def test_upload_returns_every_output_consistent_with_the_library(client, explorer):
    path = explorer.examples()[2]
    out = analyze(client, path)
    preview, teacher, surrogate = out["Uploaded image"], out["Teacher (unmodified)"], out["With the CLT replacing MLPs"]
    summary, data = out["Summary"], out["Analysis data"]
    quality = out["Reconstruction of this image per layer (all tokens)"]
    image_heatmap, dataset_heatmap = out["C(s→l), this image"], out["C(s→l), dataset"]
    galleries = [out[f"layer {layer}, {kind}"] for layer in range(explorer.n_layers)
                 for kind in ("CLS code", "patch-mean code")]
    direct = explorer.analyze(Image.open(path).convert("RGB"), "relu_topk", "all", 1, 3, 3)
    assert Path(preview).is_file()
    assert teacher["label"] == direct.predictions.teacher[0].classname
    assert surrogate["label"] == direct.predictions.surrogate[0].classname
    expected = {p.classname: p.probability for p in direct.predictions.surrogate}
    got = {c["label"]: c["confidence"] for c in surrogate["confidences"]}
    assert got.keys() == expected.keys() and all(abs(got[k] - expected[k]) < 1e-6 for k in got)
    assert "blocks 1→3" in summary and f"{direct.predictions.kl:.4f}" in summary
    assert np.allclose(data["contributions"]["cls"], direct.contributions["cls"])
    assert data["retrievals"] == direct.to_dict()["retrievals"]
    assert image_heatmap is not None and dataset_heatmap is not None
    assert [row[0] for row in quality["data"]] == list(range(explorer.n_layers))
    assert np.allclose([row[1] for row in quality["data"]], [q.r2 for q in direct.reconstruction], atol=1e-4)
    for layer in range(explorer.n_layers):
        for tokens, gallery in zip(("cls", "patches"), galleries[2 * layer:2 * layer + 2]):
            hits = direct.retrievals[tokens][layer]
            assert [item["caption"] for item in gallery] == [f"{h.classname} · {h.similarity:.2f}" for h in hits]


def test_predict_endpoint_matches_the_library(client, explorer):
    path = explorer.examples()[0]
    out = named(client, "/predict", client.predict(handle_file(str(path)), "abs_topk", "patches", 2, [0, 1, 2, 3],
                                                  api_name="/predict"))
    surrogate, summary = out["With the CLT replacing MLPs"], out["Summary"]
    direct = explorer.predict(Image.open(path).convert("RGB"), "abs_topk", "patches", 2)
    assert surrogate["label"] == direct.surrogate[0].classname and "blocks 2→3" in summary


def test_layer_term_controls_match_the_library(client, explorer):
    """Keeping the image's top-m sources, removing its top-1, and any hand-picked subset give the library's
    kept sources and predictions."""
    path = explorer.examples()[4]
    image = Image.open(path).convert("RGB")
    ranking = explorer.source_ranking(image, "jumprelu", "cls")
    scores = [s.score for s in ranking]
    assert sorted(s.layer for s in ranking) == list(range(explorer.n_layers)) and scores == sorted(scores)[::-1]
    top = named(client, "/keep_top_terms", client.predict(handle_file(str(path)), "jumprelu", "cls", 2,
                                                          api_name="/keep_top_terms"))
    kept = top["Source layers whose terms the final layer keeps"]
    assert kept == sorted(s.layer for s in ranking[:2])
    assert f"**{ranking[0].layer}** ({ranking[0].score:.2f})" in top["Source ranking"]
    removed = named(client, "/remove_top_term", client.predict(handle_file(str(path)), "jumprelu", "cls",
                                                               api_name="/remove_top_term"))
    assert removed["Source layers whose terms the final layer keeps"] == sorted(s.layer for s in ranking[1:])
    for chosen in (kept, [1, 3], []):
        out = named(client, "/predict", client.predict(handle_file(str(path)), "jumprelu", "cls", 3, chosen,
                                                      api_name="/predict"))
        direct = explorer.predict(image, "jumprelu", "cls", 3, chosen)
        got = {c["label"]: c["confidence"] for c in out["With the CLT replacing MLPs"]["confidences"]}
        assert got == pytest.approx({p.classname: p.probability for p in direct.surrogate}, abs=1e-6)
        assert f"{direct.kl:.4f}" in out["Summary"]
        assert ("keeping only the terms" in out["Summary"]) == (len(chosen) < explorer.n_layers)


def test_empty_submit_gets_a_clear_message_and_the_server_keeps_serving(client, explorer):
    with pytest.raises(Exception, match="upload an image"):
        client.predict(None, "relu_topk", "cls", 0, 3, 3, "cls", api_name="/analyze")
    assert analyze(client, explorer.examples()[1])["Teacher (unmodified)"]["label"]


@pytest.mark.browser
def test_browser_upload_renders_everything_and_range_changes_update_predictions(app_url, explorer):
    from playwright.sync_api import expect

    with chromium({"width": 1400, "height": 1800}) as browser:
        page = browser.new_page()
        page.goto(app_url)
        expect(page).to_have_title("CLT Explorer — tiny CLIP trained on synthetic shapes · bundle "
                                   f"{explorer.bundle.name}")
        page.locator("#examples img").nth(3).click()  # an example image, clicked
        expect(page.locator("#upload")).to_contain_text(explorer.examples()[3].stem, timeout=30_000)
        last = explorer.n_layers - 1
        expect(page.locator(f"#gallery_{last}_cls img").first).to_be_visible(timeout=60_000)
        expect(page.locator(f"#gallery_{last}_patches img").first).to_be_visible()
        expect(page.locator("#image_heatmap .js-plotly-plot")).to_be_visible()
        expect(page.locator("#dataset_heatmap .js-plotly-plot")).to_be_visible()
        expect(page.locator("#summary")).to_contain_text(f"blocks 0→{last}")
        expect(page.locator("#teacher")).to_contain_text("%")
        number = page.locator("#start input[type=number]")
        number.fill("2")
        number.press("Enter")
        expect(page.locator("#summary")).to_contain_text(f"blocks 2→{last}", timeout=30_000)
        page.locator("#tokens").get_by_text("patches", exact=True).click()
        expect(page.locator("#summary")).to_contain_text("the patches tokens", timeout=30_000)
        page.locator("#tokens").get_by_text("cls", exact=True).click()
        page.locator("#remove_top").click()
        expect(page.locator("#summary")).to_contain_text("keeping only the terms of source layers",
                                                         timeout=30_000)
        expect(page.locator("#source_ranking")).to_contain_text("C(s→L-1)")
        page.get_by_role("tab", name="About").click()
        expect(page.locator("#about")).to_contain_text("tiny CLIP trained on synthetic shapes")
        for figure in ("about_training", "about_reconstruction", "about_cascade"):
            expect(page.locator(f"#{figure} .js-plotly-plot")).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "about.png"), full_page=True)
        page.get_by_role("tab", name="Explore").click()
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)


def test_the_about_tab_serves_a_copy_of_the_report_made_once_per_bundle_version(explorer):
    from clt_explorer.app.ui import UploadLimits, build_app

    app = build_app(explorer, UploadLimits())
    served = Path(app.poll(None, explorer.clt_names[0])[app.about.report])
    assert served.read_bytes() == explorer.bundle.report_path.read_bytes()
    made = served.stat().st_mtime_ns
    again = Path(app.poll(None, explorer.clt_names[0])[app.about.report])  # another page opening
    assert again == served and again.stat().st_mtime_ns == made
