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

import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..model.sparsifiers import sparsifier_class
from ..model.tokens import ALL, TOKEN_GROUPS, TOKEN_SETS
from ..storage import write_bytes
from . import layer_terms

FAITHFULNESS_COLUMNS = ["layers", "tokens", "delta_acc", "flip_pct", "kl", "top1_agree", "top5_agree", "cos", "cka",
                        "spearman", "prompt_r", "prompt_kl"]
FAITHFULNESS_FORMATS = {"delta_acc": "{:+.2f}", "flip_pct": "{:.1f}", "top1_agree": "{:.1f}", "top5_agree": "{:.1f}"}
DATASET_LABELS = {"cifar100": "CIFAR-100", "coco": "COCO", "imagenet100": "ImageNet-100"}
BACKBONE_LABELS = {"ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16"}


COLOURS = plotly.colors.qualitative.D3  # one colour per CLT, the same in every panel of a figure


def colours(names) -> dict[str, str]:
    return {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(names)}


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


def faithfulness_comparison(results: dict) -> list[dict]:
    """Table 5 beside the paper's: for each range and token set the paper reports (ViT-B/32 on CIFAR-100 only),
    every metric as ours / paper."""
    if labels(results) != ("CIFAR-100", "ViT-B/32"):
        return []
    ours = {(r["layers"], r["tokens"]): r for r in faithfulness_rows(results)}
    rows = []
    for paper in paper_rows("faithfulness_vitb32_cifar100"):
        mine = ours.get((paper["layers"], paper["tokens"]))
        if mine:
            rows.append({"layers": paper["layers"], "tokens": paper["tokens"],
                         **{c: f"{mine[c]} / {paper[c]}" for c in FAITHFULNESS_COLUMNS[2:]}})
    return rows


def layer_terms_markdown(results: dict[str, dict]) -> str:
    """Per CLT and token set: the removal of each source (C, accuracy, drop, flip, KL) and the retention curves
    (accuracy when keeping the top-m sources by each ranking), with the two-line summary."""
    parts = []
    for name, result in results.items():
        L = result["target"] + 1
        for tokens, r in result["tokens"].items():
            full = r["full"]["accuracy"]
            single = {row["layer"]: row for row in r["rows"] if row["ranking"] == "single"}
            removal = [{"source s": s, "C(s→L-1)": f"{r['dataset_contributions'][s]:.3f}",
                        "top-1 accuracy": f"{single[s]['accuracy']:.2f}",
                        "drop": f"{full - single[s]['accuracy']:+.2f}", "flip %": f"{single[s]['flip_rate']:.1f}",
                        "KL": f"{single[s]['kl']:.4f}"} for s in range(L)]
            retain = {(row["ranking"], row["m"]): row for row in r["rows"] if row["experiment"] == "retain"}
            curves = [{"m": m, **{ranking: f"{retain[ranking, m]['accuracy']:.2f}" + (
                f" ± {retain[ranking, m]['accuracy_sd']:.2f}" if ranking == "random" else "")
                for ranking in layer_terms.RANKINGS}} for m in range(1, L + 1)]
            parts.append(f"**Layer terms of {name}, {tokens} tokens, CLT in blocks {result['start']}→{L - 1}** "
                         f"(teacher {result['baseline']:.2f}, all terms {full:.2f}; Spearman(C, drop) = "
                         f"{r['spearman_c_vs_drop']:.2f})\n\n" + markdown_table(removal, list(removal[0])) + "\n\n"
                         + markdown_table(curves, ["m", *layer_terms.RANKINGS]) + "\n\n"
                         + "\n".join(layer_terms.summary_lines(name, tokens, result, result["baseline"])))
    return "\n\n".join(parts)


def _grid(names: list[str], columns: list[str], title: str, height_per_row: int = 300) -> go.Figure:
    figure = make_subplots(rows=len(names), cols=len(columns), shared_yaxes=True,
                           subplot_titles=[f"{n} — {c}" for n in names for c in columns])
    figure.update_layout(title=title, height=height_per_row * len(names) + 120, width=360 * len(columns) + 120)
    return figure


def layer_terms_figures(results: dict[str, dict]) -> dict[str, go.Figure]:
    """``layer_terms_retention``: accuracy against the number m of kept sources per ranking (random: mean ± sd
    over the draws), with the teacher and the all-terms replacement; ``layer_terms_removal``: the accuracy drop of
    removing each source against its C(s→L-1)."""
    names = list(results)
    tokens = list(next(iter(results.values()))["tokens"])
    retention = _grid(names, tokens, "Keeping only the top-m source layers of the final representation")
    removal = _grid(names, tokens, "Removing one source layer: accuracy drop against its contribution score")
    colours = dict(zip(layer_terms.RANKINGS, ("#1f77b4", "#2ca02c", "#d62728", "#7f7f7f")))
    for row, name in enumerate(names, start=1):
        result = results[name]
        for col, group in enumerate(tokens, start=1):
            r = result["tokens"][group]
            first = row == 1 and col == 1
            for ranking in layer_terms.RANKINGS:
                points = [p for p in r["rows"] if p["experiment"] == "retain" and p["ranking"] == ranking]
                error = {"type": "data", "array": [p["accuracy_sd"] for p in points]} if ranking == "random" else None
                retention.add_trace(go.Scatter(x=[p["m"] for p in points], y=[p["accuracy"] for p in points],
                                               error_y=error, mode="lines+markers", name=ranking, legendgroup=ranking,
                                               showlegend=first, line={"color": colours[ranking]}), row=row, col=col)
            ms = list(range(1, result["target"] + 2))
            for value, label, dash in ((result["baseline"], "teacher", "dash"), (r["full"]["accuracy"], "all terms",
                                                                                   "dot")):
                retention.add_trace(go.Scatter(x=ms, y=[value] * len(ms), mode="lines", name=label, legendgroup=label,
                                               showlegend=first, line={"color": "black", "dash": dash}),
                                    row=row, col=col)
            single = sorted((p for p in r["rows"] if p["ranking"] == "single"), key=lambda p: p["layer"])
            removal.add_trace(go.Scatter(x=[r["dataset_contributions"][p["layer"]] for p in single],
                                         y=[r["full"]["accuracy"] - p["accuracy"] for p in single],
                                         text=[f"s = {p['layer']}" for p in single], mode="markers+text",
                                         textposition="top center", showlegend=False), row=row, col=col)
    retention.update_xaxes(title_text="sources kept, m", dtick=1)
    retention.update_yaxes(title_text="top-1 accuracy (%)", col=1)
    removal.update_xaxes(title_text="C(s→L-1)")
    removal.update_yaxes(title_text="accuracy drop (points)", col=1)
    return {"layer_terms_retention": retention, "layer_terms_removal": removal}


def prompt_sensitivity_figure(results: dict, name: str) -> go.Figure:
    """Per-template accuracy of the teacher and of the surrogate (full cascade and last block), per token group:
    the figure behind prompt r."""
    figure = make_subplots(rows=1, cols=len(TOKEN_GROUPS), shared_yaxes=True,
                           subplot_titles=[f"{name} — {t}" for t in TOKEN_GROUPS])
    n_layers = len(results["l0"])
    for col, tokens in enumerate(TOKEN_GROUPS, start=1):
        ranges = results["cascade"][tokens]
        teacher = ranges[0]["template_accuracy"]["teacher"]
        templates = list(range(len(teacher)))
        figure.add_trace(go.Scatter(x=templates, y=teacher, mode="lines+markers", name="teacher", legendgroup="teacher",
                                    showlegend=col == 1, line={"color": "black"}), row=1, col=col)
        for metrics in (ranges[0], ranges[-1]):
            label = f"CLT {_range_label(metrics['start'], n_layers)} (r = {metrics['prompt_r']:.3f})"
            figure.add_trace(go.Scatter(x=templates, y=metrics["template_accuracy"]["surrogate"],
                                        mode="lines+markers", name=label), row=1, col=col)
    figure.update_xaxes(title_text="prompt template")
    figure.update_yaxes(title_text="top-1 accuracy (%)", col=1)
    figure.update_layout(title="Prompt sensitivity: accuracy per template", height=400, width=1100)
    return figure


def reconstruction_figure(results: dict[str, dict], tokens: str = ALL) -> go.Figure:
    """Cosine, MSE (log scale) and R^2 per layer for each CLT (figures 6-10)."""
    figure = make_subplots(rows=1, cols=3, subplot_titles=("cosine similarity", "MSE (log)", "R²"))
    colour = colours(results)
    for name, r in results.items():
        per_layer = r["reconstruction"][tokens]
        layers = list(range(len(per_layer["r2"])))
        for col, metric in enumerate(("cosine", "mse", "r2"), start=1):
            figure.add_trace(go.Scatter(x=layers, y=per_layer[metric], mode="lines+markers", name=name,
                                        legendgroup=name, showlegend=col == 1, line={"color": colour[name]}),
                             row=1, col=col)
    figure.update_yaxes(type="log", row=1, col=2)
    figure.update_xaxes(title_text="layer")
    figure.update_layout(title=f"Reconstruction per layer ({tokens} tokens)", height=380, width=1100)
    return figure


def cascade_figure(results: dict[str, dict]) -> go.Figure:
    """Zero-shot accuracy with the CLT replacing blocks s..L-1, against the start layer s, one panel per token set,
    one line per CLT, beside the unmodified teacher (tables 6-23 as curves)."""
    first = next(iter(results.values()))
    token_sets = [t for t in TOKEN_SETS if t in first["cascade"]]
    figure = make_subplots(rows=1, cols=len(token_sets), shared_yaxes=True,
                           subplot_titles=[f"{t} tokens replaced" for t in token_sets])
    starts = first["cascade"]["starts"]
    colour = colours(results)
    for col, tokens in enumerate(token_sets, start=1):
        for name, r in results.items():
            figure.add_trace(go.Scatter(x=starts, y=[m["accuracy"] for m in r["cascade"][tokens]], mode="lines+markers",
                                        name=name, legendgroup=name, showlegend=col == 1, line={"color": colour[name]}),
                             row=1, col=col)
        figure.add_trace(go.Scatter(x=starts, y=[first["cascade"]["baseline"]] * len(starts), mode="lines",
                                    name="teacher", legendgroup="teacher", showlegend=col == 1,
                                    line={"color": "black", "dash": "dash"}), row=1, col=col)
    figure.update_xaxes(title_text="first replaced block s (CLT in blocks s..L-1)", dtick=1)
    figure.update_yaxes(title_text="top-1 accuracy (%)", col=1)
    figure.update_layout(title="Accuracy under cascaded replacement", height=380, width=1100)
    return figure


def training_figure(logs: dict[str, list[dict]]) -> go.Figure:
    """Training curves per CLT from its log: the loss and the mean fraction of variance unexplained (1 - R²)."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("loss (log)", "mean FVU over layers (log)"))
    colour = colours(logs)
    for name, records in logs.items():
        steps = [r["step"] for r in records]
        line = {"color": colour[name]}
        figure.add_trace(go.Scatter(x=steps, y=[r["loss"] for r in records], mode="lines", name=name,
                                    legendgroup=name, line=line), row=1, col=1)
        figure.add_trace(go.Scatter(x=steps, y=[sum(r["fvu"]) / len(r["fvu"]) for r in records], mode="lines",
                                    name=name, legendgroup=name, showlegend=False, line=line), row=1, col=2)
    figure.update_yaxes(type="log")
    figure.update_xaxes(title_text="training step")
    figure.update_layout(title="Training", height=360, width=1100)
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


def write_report(results: dict[str, dict], out: str | Path, primary: str | None = None,
                 layer_term_results: dict[str, dict] | None = None) -> list[Path]:
    """Every table and figure of a set of CLT evaluations (keyed by CLT name, same teacher and data), and of the
    layer-term experiment when given; ``primary`` names the CLT of faithfulness.csv (default: the first)."""
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
    figures = {f"reconstruction_{tokens}": reconstruction_figure(results, tokens) for tokens in TOKEN_SETS}
    figures["contributions"] = contributions_figure(results)
    figures["prompt_sensitivity"] = prompt_sensitivity_figure(results[primary], primary)
    if layer_term_results:
        texts["layer_terms.csv"] = csv_text([row for name, r in layer_term_results.items()
                                             for row in layer_terms.csv_rows(name, r)], layer_terms.CSV_COLUMNS)
        tables.append(layer_terms_markdown(layer_term_results))
        figures.update(layer_terms_figures(layer_term_results))
    texts["tables.md"] = "\n\n".join(tables) + "\n"
    written = []
    for name, text in texts.items():
        write_bytes(out / name, text.encode())
        written.append(out / name)
    for name, figure in figures.items():
        written += write_figure(figure, out / name)
    return written
