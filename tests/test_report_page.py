"""The bundle's report page opens anywhere: every figure draws from the page alone, with the network off."""

import pytest
from conftest import ARTIFACTS, chromium

from clt_explorer.assets.evaluation_runs import write_bundle_report


@pytest.fixture(scope="module")
def report(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    written = write_bundle_report(tiny_bundle, out, image_formats=("png",))
    return out, written


def test_the_report_has_every_part_and_no_cdn(report, tiny_bundle):
    out, written = report
    page = (out / "report.html").read_text()
    assert (out / "report.html") in written and (out / "plotly.min.js").is_file()
    assert '<script src="http' not in page and "cdn.plot.ly/plotly" not in page
    for section in ("The bundle", "Reconstruction", "Cross-layer contributions", "Cascaded replacement",
                    "Faithfulness", "Prompt sensitivity", "Layer terms of the final representation"):
        assert f"<h2>{section}</h2>" in page, section
    assert tiny_bundle.teacher_description in page and "top-1 removal costs" in page
    for html_figure in out.glob("*.html"):
        if html_figure.name != "report.html":
            assert 'src="plotly.min.js"' in html_figure.read_text(), html_figure.name


@pytest.mark.browser
def test_every_figure_of_the_report_draws_offline(report):
    out, _ = report
    with chromium({"width": 1300, "height": 900}, offline=True) as browser:
        requests = []
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto((out / "report.html").as_uri())
        page.wait_for_load_state("load")
        figures = page.locator("div.figure")
        assert figures.count() == 8  # reconstruction x 3, contributions, cascade, prompts, layer terms x 2
        for i in range(figures.count()):
            figure = figures.nth(i)
            figure.scroll_into_view_if_needed()
            assert figure.locator(".js-plotly-plot .main-svg").count() >= 1, figure.get_attribute("id")
            drawn = figure.locator(".main-svg .trace, .main-svg .hm, .main-svg image").count()
            assert drawn > 0, figure.get_attribute("id")
        assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
