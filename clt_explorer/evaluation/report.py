"""Writing a set of CLT evaluations: the tables (CSV, markdown), the figures (HTML that renders offline, PNG and SVG)
and one self-contained report page.

- Figures as HTML load ``plotly.min.js`` from the same folder (written once beside them), never from a CDN, so they
  render on a machine without internet. ``report.html`` carries plotly.js itself, once, and every figure, table and
  retrieval grid: one file that opens anywhere.
- PNG and SVG go through kaleido, which drives a Chromium-based browser: ``$BROWSER_PATH``, else ``chromium``,
  ``chromium-browser``, ``google-chrome`` or ``google-chrome-stable`` on the PATH (on Debian: ``apt-get install
  chromium``, the browser the tests use). Without one the images are skipped with a message saying so.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import plotly.graph_objects as go
import plotly.io
import plotly.offline

from ..model.tokens import TOKEN_SETS
from ..storage import write_bytes
from . import layer_terms
from .figures import (
    cascade_figure,
    contributions_figure,
    layer_terms_figures,
    prompt_sensitivity_figure,
    reconstruction_figure,
)
from .tables import (
    FAITHFULNESS_COLUMNS,
    cascade_columns,
    cascade_markdown,
    cascade_rows,
    csv_text,
    faithfulness_comparison,
    faithfulness_rows,
    layer_terms_markdown,
    markdown_table,
    paper_comparison,
    reconstruction_rows,
)

PLOTLY_JS = "plotly.min.js"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
IMAGE_SCALE = 2  # PNG pixels per layout pixel: sharp when printed at single-column width


def find_browser() -> str | None:
    """The Chromium-based browser kaleido will drive, or None."""
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def write_html_figures(figures: dict[str, go.Figure], out: Path) -> list[Path]:
    """``<name>.html`` per figure, all loading the one ``plotly.min.js`` written beside them (no CDN)."""
    written = [out / PLOTLY_JS]
    write_bytes(out / PLOTLY_JS, plotly.offline.get_plotlyjs().encode())
    for name, figure in figures.items():
        write_bytes(out / f"{name}.html", figure.to_html(include_plotlyjs="directory").encode())
        written.append(out / f"{name}.html")
    return written


def write_images(figures: dict[str, go.Figure], out: Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """The figures as images (one browser session for all), or none with a warning when no browser is found."""
    browser = find_browser()
    if browser is None:
        warnings.warn("PNG/SVG export skipped: kaleido needs a Chromium-based browser and none was found "
                      f"(looked for $BROWSER_PATH and {', '.join(BROWSERS)}). On Debian: apt-get install chromium. "
                      "The HTML figures were written.")
        return []
    os.environ["BROWSER_PATH"] = browser
    targets = [(figure, out / f"{name}.{fmt}") for name, figure in figures.items() for fmt in formats]
    with tempfile.TemporaryDirectory(dir=out, prefix=".images-") as tmp:
        staged = [Path(tmp) / path.name for _, path in targets]
        try:
            plotly.io.write_images([figure for figure, _ in targets], staged, scale=IMAGE_SCALE)
        except Exception as error:  # kaleido reports a browser that will not start in many ways
            warnings.warn(f"PNG/SVG export with {browser} failed ({type(error).__name__}: {error}); the HTML figures "
                          f"were written")
            return []
        for source, (_, path) in zip(staged, targets):
            os.replace(source, path)
    return [path for _, path in targets]


def report_figures(results: dict[str, dict], primary: str, layer_term_results: dict[str, dict] | None
                   ) -> dict[str, go.Figure]:
    """Every figure of a set of evaluations, by file name."""
    figures = {f"reconstruction_{tokens}": reconstruction_figure(results, tokens) for tokens in TOKEN_SETS}
    figures["contributions"] = contributions_figure(results)
    figures["cascade_accuracy"] = cascade_figure(results)
    figures["prompt_sensitivity"] = prompt_sensitivity_figure(results[primary], primary)
    if layer_term_results:
        figures.update(layer_terms_figures(layer_term_results))
    return figures


def write_report(results: dict[str, dict], out: str | Path, primary: str | None = None,
                 layer_term_results: dict[str, dict] | None = None, about: dict | None = None,
                 grids: list[Path] = (), image_formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Every table and figure of a set of CLT evaluations (keyed by CLT name, same teacher and data), the layer-term
    experiment's when given, and ``report.html`` (with ``about``, a description of the bundle, and ``grids``,
    retrieval grid images); ``primary`` names the CLT of faithfulness.csv (default: the first)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    primary = primary or next(iter(results))
    tables = [cascade_markdown(results), *(f"**Faithfulness of {name}**\n\n"
                                           + markdown_table(faithfulness_rows(r), FAITHFULNESS_COLUMNS)
                                           for name, r in results.items())]
    texts = {
        "cascade_accuracy.csv": csv_text(cascade_rows(results), cascade_columns(results)),
        "faithfulness.csv": csv_text(faithfulness_rows(results[primary]), FAITHFULNESS_COLUMNS),
        "reconstruction.csv": csv_text(reconstruction_rows(results)),
    }
    for name, r in results.items():
        texts[f"faithfulness_{name}.csv"] = csv_text(faithfulness_rows(r), FAITHFULNESS_COLUMNS)
    comparison = paper_comparison(results)
    if comparison:
        texts["paper_comparison.csv"] = csv_text(comparison)
    table5 = faithfulness_comparison(results[primary])
    if table5:
        texts["paper_faithfulness_comparison.csv"] = csv_text(table5)
        tables.append(f"**Table 5 beside the paper ({primary}; ours / paper)**\n\n"
                      + markdown_table(table5, FAITHFULNESS_COLUMNS))
    if layer_term_results:
        texts["layer_terms.csv"] = csv_text([row for name, r in layer_term_results.items()
                                             for row in layer_terms.csv_rows(name, r)], layer_terms.CSV_COLUMNS)
        tables.append(layer_terms_markdown(layer_term_results))
    texts["tables.md"] = "\n\n".join(tables) + "\n"
    written = []
    for name, text in texts.items():
        write_bytes(out / name, text.encode())
        written.append(out / name)
    figures = report_figures(results, primary, layer_term_results)
    written += write_html_figures(figures, out)
    written += write_images(figures, out, image_formats)
    write_bytes(out / "report.html", report_page(results, primary, layer_term_results, about or {}, figures,
                                                 grids).encode())
    return [*written, out / "report.html"]


def _table_html(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(row.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_html(name: str, figure: go.Figure) -> str:
    return (f'<div class="figure" id="figure-{name}">'
            + figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{name}",
                             config={"responsive": True, "displaylogo": False}) + "</div>")


def report_page(results: dict[str, dict], primary: str, layer_term_results: dict[str, dict] | None, about: dict,
                figures: dict[str, go.Figure], grids: list[Path]) -> str:
    """One HTML page, readable offline: plotly.js embedded once, then what the bundle is, reconstruction,
    contributions, cascaded replacement beside the baseline and the paper, faithfulness, prompt sensitivity, the
    layer-term experiment and the retrieval grids."""
    title = f"CLT Explorer report — {about.get('name', 'evaluation')}"
    sections = [f"<h1>{html.escape(title)}</h1>"]
    if about:
        sections.append("<h2>The bundle</h2>" + _table_html([{"": key, "value": value} for key, value in
                                                             about.get("facts", {}).items()], ["", "value"]))
        if about.get("clts"):
            sections.append("<h3>CLTs</h3>" + _table_html(about["clts"]))
        if about.get("settings"):
            settings = html.escape(json.dumps(about["settings"], indent=2))
            sections.append(f"<details><summary>Settings</summary><pre>{settings}</pre></details>")
    sections.append("<h2>Reconstruction</h2><p>Per layer, of the MLP outputs over held-out images (figures 6-10).</p>"
                    + "".join(_figure_html(f"reconstruction_{t}", figures[f"reconstruction_{t}"]) for t in TOKEN_SETS))
    sections.append("<h2>Cross-layer contributions</h2><p>C(s→l): the share of target layer l's reconstruction that "
                    "source layer s writes (figures 11-16).</p>"
                    + _figure_html("contributions", figures["contributions"]))
    sections.append("<h2>Cascaded replacement</h2><p>The CLT replaces the MLP outputs of the chosen tokens in blocks "
                    "s..L-1 (tables 6-23); dotted: the paper's numbers where dataset and backbone match.</p>"
                    + _figure_html("cascade_accuracy", figures["cascade_accuracy"])
                    + _table_html(cascade_rows(results), cascade_columns(results)))
    comparison = paper_comparison(results)
    if comparison:
        sections.append("<h3>Beside the paper</h3>" + _table_html(comparison))
    sections.append(f"<h2>Faithfulness</h2><p>Of {html.escape(primary)} (table 5; the metrics are defined in "
                    "clt_explorer/evaluation/metrics.py).</p>"
                    + _table_html(faithfulness_rows(results[primary]), FAITHFULNESS_COLUMNS))
    table5 = faithfulness_comparison(results[primary])
    if table5:
        sections.append("<h3>Table 5 beside the paper (ours / paper)</h3>" + _table_html(table5, FAITHFULNESS_COLUMNS))
    sections.append("<h2>Prompt sensitivity</h2>" + _figure_html("prompt_sensitivity", figures["prompt_sensitivity"]))
    if layer_term_results:
        summary = [line for name, r in layer_term_results.items() for tokens in r["tokens"]
                   for line in layer_terms.summary_lines(name, tokens, r, r["baseline"])]
        sections.append("<h2>Layer terms of the final representation</h2><ul>"
                        + "".join(f"<li>{html.escape(line)}</li>" for line in summary) + "</ul>"
                        + _figure_html("layer_terms_retention", figures["layer_terms_retention"])
                        + _figure_html("layer_terms_removal", figures["layer_terms_removal"]))
    if grids:
        images = "".join(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                         f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}'
                         "</figcaption></figure>" for p in grids)
        sections.append("<h2>Layer-wise retrieval</h2><p>The top training images of every layer by exact search over "
                        "the CLS code and the patch-mean code (figures 4 and 5).</p>"
                        f'<div class="grids">{images}</div>')
    style = ("body{font-family:system-ui,sans-serif;max-width:1250px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}"
             "th{background:#f3f3f3}.figure{margin:1em 0}.grids{display:flex;flex-wrap:wrap;gap:1em}"
             "figure{margin:0}figcaption{font-size:12px}")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style><script>{plotly.offline.get_plotlyjs()}</script></head>"
            f"<body>{''.join(sections)}</body></html>")
