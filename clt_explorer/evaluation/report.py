"""Evaluation results -> the paper's tables (CSV, markdown), plotly figures and a comparison with the
paper's numbers (``data/resources/paper_*.csv``, tables 5-23 of the supplement)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import warnings
from importlib.resources import files
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..model.sparsifiers import sparsifier_class
from ..model.tokens import ALL, TOKEN_GROUPS, TOKEN_SETS
from ..storage import write_bytes

FAITHFULNESS_COLUMNS = ["layers", "tokens", "delta_acc", "flip_pct", "kl", "top1_agree", "top5_agree", "cos", "cka",
                        "spearman", "prompt_r", "prompt_kl"]
FAITHFULNESS_FORMATS = {"delta_acc": "{:+.2f}", "flip_pct": "{:.1f}", "top1_agree": "{:.1f}", "top5_agree": "{:.1f}"}
DATASET_LABELS = {"cifar100": "CIFAR-100", "coco": "COCO", "imagenet100": "ImageNet-100"}
BACKBONE_LABELS = {"ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16"}


def paper_rows(name: str) -> list[dict]:
    """Rows of a packaged paper CSV (``cascade_accuracy`` or ``faithfulness_vitb32_cifar100``)."""
    text = files("clt_explorer.data").joinpath("resources", f"paper_{name}.csv").read_text()
    return list(csv.DictReader(io.StringIO(text)))


PAPER_CASCADE_HEADER = list(paper_rows("cascade_accuracy")[0])
PAPER_SPARSIFIERS = PAPER_CASCADE_HEADER[PAPER_CASCADE_HEADER.index("start_layer") + 1:-1]  # the paper's columns


def cascade_columns(results: dict[str, dict]) -> list[str]:
    """The paper's CSV header, with a column per CLT: the paper's sparsifier columns, then CLTs named otherwise."""
    extra = [name for name in results if name not in PAPER_SPARSIFIERS]
    return [*PAPER_CASCADE_HEADER[:-1], *extra, PAPER_CASCADE_HEADER[-1]]


def column_label(name: str, result: dict) -> str:
    """A CLT's column title: the paper's short name (JR, RTK, ATK) when it is named after its sparsifier."""
    return sparsifier_class(name).short_name if name == result.get("sparsifier") else name


def labels(results: dict) -> tuple[str, str]:
    """The paper's dataset and backbone labels of a result (its own names when the paper has none)."""
    return (DATASET_LABELS.get(results.get("dataset", ""), results.get("dataset", "")),
            BACKBONE_LABELS.get(results.get("backbone", ""), results.get("backbone", "")))


def _range_label(start: int, n_layers: int) -> str:
    return str(n_layers - 1) if start == n_layers - 1 else f"{start}-{n_layers - 1}"


def cascade_rows(results: dict[str, dict]) -> list[dict]:
    """One row per token set and start layer, accuracies (%) per CLT: the paper's CSV layout."""
    first = next(iter(results.values()))
    dataset, backbone = labels(first)
    tables = {(r["dataset"], r["backbone"], r["tokens"]): r["table"] for r in paper_rows("cascade_accuracy")}
    rows = []
    columns = cascade_columns(results)
    for tokens in TOKEN_SETS:
        if tokens not in first["cascade"]:
            continue
        for i, start in enumerate(first["cascade"]["starts"]):
            row = {"table": tables.get((dataset, backbone, tokens), ""), "dataset": dataset, "backbone": backbone,
                   "tokens": tokens, "start_layer": start}
            for name in columns[columns.index("start_layer") + 1:-1]:
                row[name] = f"{results[name]['cascade'][tokens][i]['accuracy']:.2f}" if name in results else ""
            row["baseline"] = f"{first['cascade']['baseline']:.2f}"
            rows.append(row)
    return rows


def faithfulness_rows(results: dict) -> list[dict]:
    """Table 5's layout for one CLT: every range s -> L-1 for CLS and patch tokens."""
    n_layers = len(results["l0"])
    rows = []
    for tokens in TOKEN_GROUPS:
        for metrics in results["cascade"].get(tokens, []):
            row = {"layers": _range_label(metrics["start"], n_layers), "tokens": tokens}
            for column in FAITHFULNESS_COLUMNS[2:]:
                row[column] = FAITHFULNESS_FORMATS.get(column, "{:.3f}").format(metrics[column])
            rows.append(row)
    return rows


def reconstruction_rows(results: dict[str, dict]) -> list[dict]:
    """Per CLT, token set and layer: cosine, MSE and R^2."""
    rows = []
    for name, r in results.items():
        for tokens, per_layer in r["reconstruction"].items():
            for layer in range(len(per_layer["r2"])):
                rows.append({"clt": name, "tokens": tokens, "layer": layer,
                             **{m: f"{per_layer[m][layer]:.6g}" for m in ("cosine", "mse", "r2")}})
    return rows


def csv_text(rows: list[dict], columns: list[str] | None = None) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns or list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def cascade_markdown(results: dict[str, dict]) -> str:
    """Tables 6-23's layout: per token set, Range | JR | RTK | ATK (one column per CLT), baseline in the caption."""
    first = next(iter(results.values()))
    dataset, backbone = labels(first)
    n_layers = len(first["l0"])
    rows = cascade_rows(results)
    parts = []
    titles = {name: column_label(name, result) for name, result in results.items()}
    for tokens in TOKEN_SETS:
        selected = [r for r in rows if r["tokens"] == tokens]
        if not selected:
            continue
        table = [{"Range": f"{r['start_layer']}→{n_layers - 1}", **{titles[n]: r[n] for n in titles}}
                 for r in selected]
        parts.append(f"**Top-1 accuracy (%) on {dataset}, {backbone}, {tokens} tokens** "
                     f"(baseline {first['cascade']['baseline']:.2f})\n\n"
                     + markdown_table(table, ["Range", *titles.values()]))
    return "\n\n".join(parts)


def paper_comparison(results: dict[str, dict]) -> list[dict]:
    """Our cascade accuracies beside the paper's where dataset, backbone, token set and start match; each CLT is
    compared with the paper's column of its sparsifier."""
    ours = {(r["dataset"], r["backbone"], r["tokens"], str(r["start_layer"])): r for r in cascade_rows(results)}
    rows = []
    for paper in paper_rows("cascade_accuracy"):
        key = (paper["dataset"], paper["backbone"], paper["tokens"], paper["start_layer"])
        if key not in ours:
            continue
        for name, result in results.items():
            if result.get("sparsifier") in PAPER_SPARSIFIERS:
                mine, theirs = float(ours[key][name]), float(paper[result["sparsifier"]])
                rows.append({"table": paper["table"], "tokens": key[2], "start_layer": key[3], "clt": name,
                             "sparsifier": result["sparsifier"], "ours": f"{mine:.2f}", "paper": f"{theirs:.2f}",
                             "difference": f"{mine - theirs:+.2f}"})
    return rows


def reconstruction_figure(results: dict[str, dict], tokens: str = ALL) -> go.Figure:
    """Cosine, MSE (log scale) and R^2 per layer for each CLT (figures 6-10)."""
    figure = make_subplots(rows=1, cols=3, subplot_titles=("cosine similarity", "MSE (log)", "R²"))
    for name, r in results.items():
        per_layer = r["reconstruction"][tokens]
        layers = list(range(len(per_layer["r2"])))
        for col, metric in enumerate(("cosine", "mse", "r2"), start=1):
            figure.add_trace(go.Scatter(x=layers, y=per_layer[metric], mode="lines+markers", name=name,
                                        legendgroup=name, showlegend=col == 1), row=1, col=col)
    figure.update_yaxes(type="log", row=1, col=2)
    figure.update_xaxes(title_text="layer")
    figure.update_layout(title=f"Reconstruction per layer ({tokens} tokens)", height=380, width=1100)
    return figure


def contribution_heatmap(matrix: list[list[float]], title: str = "") -> go.Figure:
    """One lower-triangular C_{s->l} heatmap: rows are targets l, columns sources s."""
    n = len(matrix)
    masked = [[matrix[l][s] if s <= l else None for s in range(n)] for l in range(n)]
    figure = go.Figure(go.Heatmap(z=masked, x=list(range(n)), y=list(range(n)), zmin=0, zmax=1,
                                  colorscale="Viridis", colorbar={"title": "C"},
                                  hovertemplate="source %{x} → target %{y}: %{z:.3f}<extra></extra>"))
    figure.update_layout(title=title, xaxis_title="source layer s", yaxis_title="target layer l", height=420, width=460,
                         yaxis={"autorange": "reversed"})
    return figure


def contributions_figure(results: dict[str, dict]) -> go.Figure:
    """Figures 11-16: rows CLS and patches, columns the CLTs."""
    names = list(results)
    figure = make_subplots(rows=2, cols=len(names), subplot_titles=[f"{n} — {t}" for t in TOKEN_GROUPS
                                                                     for n in names])
    for col, name in enumerate(names, start=1):
        for row, tokens in enumerate(TOKEN_GROUPS, start=1):
            heatmap = contribution_heatmap(results[name]["contributions"][tokens]).data[0]
            heatmap.showscale = col == len(names) and row == 1
            figure.add_trace(heatmap, row=row, col=col)
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(title="Cross-layer contribution scores C(s→l)", height=720, width=380 * len(names) + 120)
    return figure


def evaluation_summary_markdown(summary: dict[str, dict]) -> list[str]:
    """Markdown table lines of a bundle's evaluation summary (one row per CLT)."""
    lines = ["| CLT | images | teacher top-1 % | mean R² | mean L0 | top-1 % with the CLT in every block: "
             "cls / patches / all |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        full = s["accuracy_full_cascade"]
        cascade = " / ".join(f"{full[t]:.2f}" for t in TOKEN_SETS if t in full)
        lines.append(f"| {name} | {s['n_images']} | {s['baseline_accuracy']:.2f} | {s['mean_r2']:.3f} | "
                     f"{s['mean_l0']:.1f} | {cascade} |")
    return lines


def write_figure(figure: go.Figure, path_without_suffix: Path) -> list[Path]:
    """Write ``.html`` always and ``.png`` when kaleido finds a Chrome/Chromium; returns what was written."""
    html = path_without_suffix.with_suffix(".html")
    write_bytes(html, figure.to_html(include_plotlyjs="cdn").encode())
    written = [html]
    if "BROWSER_PATH" not in os.environ:
        browser = shutil.which("chromium") or shutil.which("google-chrome")
        if browser:
            os.environ["BROWSER_PATH"] = browser
    try:
        png = path_without_suffix.with_suffix(".png")
        write_bytes(png, figure.to_image(format="png", scale=1))
        written.append(png)
    except Exception as error:  # kaleido needs a browser; the HTML figure stands on its own
        warnings.warn(f"PNG export of {path_without_suffix.name} skipped: {error}")
    return written


def write_report(results: dict[str, dict], out: str | Path, primary: str | None = None) -> list[Path]:
    """Every table and figure of a set of CLT evaluations (keyed by CLT name, same teacher and data);
    ``primary`` names the CLT of faithfulness.csv (default: the first)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    primary = primary or next(iter(results))
    texts = {
        "cascade_accuracy.csv": csv_text(cascade_rows(results), cascade_columns(results)),
        "faithfulness.csv": csv_text(faithfulness_rows(results[primary]), FAITHFULNESS_COLUMNS),
        "reconstruction.csv": csv_text(reconstruction_rows(results)),
        "tables.md": cascade_markdown(results) + "\n\n" + "\n\n".join(
            f"**Faithfulness of {name}**\n\n" + markdown_table(faithfulness_rows(r), FAITHFULNESS_COLUMNS)
            for name, r in results.items()) + "\n",
    }
    for name, r in results.items():
        texts[f"faithfulness_{name}.csv"] = csv_text(faithfulness_rows(r), FAITHFULNESS_COLUMNS)
    comparison = paper_comparison(results)
    if comparison:
        texts["paper_comparison.csv"] = csv_text(comparison)
    written = []
    for name, text in texts.items():
        write_bytes(out / name, text.encode())
        written.append(out / name)
    for tokens in TOKEN_SETS:
        written += write_figure(reconstruction_figure(results, tokens), out / f"reconstruction_{tokens}")
    written += write_figure(contributions_figure(results), out / "contributions")
    return written
