"""Evaluation results -> plotly figures, fit for a paper: axis titles with units, one colour per CLT in every panel,
a shared colour scale where heatmaps are compared, and fonts that stay legible when a PNG export (2x scale) is
printed at single-column width."""

from __future__ import annotations

import functools
import json

import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..model.tokens import ALL, TOKEN_GROUPS, TOKEN_SETS
from . import layer_terms
from .tables import labels, paper_rows, range_label

COLOURS = plotly.colors.qualitative.D3  # one colour per CLT, the same in every panel of a figure
RANKING_COLOURS = dict(zip(layer_terms.RANKINGS, ("#1f77b4", "#2ca02c", "#d62728", "#7f7f7f")))
PANEL_WIDTH, PANEL_HEIGHT = 330, 300
ACCURACY = "top-1 accuracy (%)"


def colours(names) -> dict[str, str]:
    return {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(names)}


def panels(rows: int, cols: int, titles: list[str], title: str, shared_y: bool = False) -> go.Figure:
    """A grid of panels in the house style (white background, 13 px text, legend above the panels)."""
    figure = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_yaxes=shared_y,
                           horizontal_spacing=0.08 if not shared_y else 0.04, vertical_spacing=0.16 / max(1, rows - 1)
                           if rows > 1 else 0.1)
    figure.update_layout(title={"text": title, "x": 0.01}, template="simple_white", font={"size": 13},
                         width=PANEL_WIDTH * cols + 140, height=PANEL_HEIGHT * rows + 140,
                         margin={"l": 70, "r": 30, "t": 110, "b": 60},
                         legend={"orientation": "h", "yanchor": "bottom", "y": 1.06, "x": 0})
    figure.update_annotations(font_size=13)
    return figure


def reconstruction_figure(results: dict[str, dict], tokens: str = ALL) -> go.Figure:
    """Cosine, MSE (log scale) and R² per layer for each CLT (figures 6-10)."""
    figure = panels(1, 3, ["cosine similarity", "MSE", "R²"], f"Reconstruction of the MLP outputs per layer "
                    f"({tokens} tokens)")
    colour = colours(results)
    for name, r in results.items():
        per_layer = r["reconstruction"][tokens]
        layers = list(range(len(per_layer["r2"])))
        for col, metric in enumerate(("cosine", "mse", "r2"), start=1):
            figure.add_trace(go.Scatter(x=layers, y=per_layer[metric], mode="lines+markers", name=name,
                                        legendgroup=name, showlegend=col == 1, line={"color": colour[name]}),
                             row=1, col=col)
    figure.update_yaxes(title_text="cosine(ŷ, y)", row=1, col=1)
    figure.update_yaxes(type="log", title_text="mean squared error per element (log scale)", row=1, col=2)
    figure.update_yaxes(title_text="R² = 1 − FVU", row=1, col=3)
    figure.update_xaxes(title_text="layer l", dtick=1)
    return figure


def cascade_figure(results: dict[str, dict]) -> go.Figure:
    """Zero-shot accuracy with the CLT replacing blocks s..L-1 against the start s, a panel per token set, a line per
    CLT, beside the unmodified teacher and (dotted) the paper's numbers where dataset and backbone match."""
    first = next(iter(results.values()))
    token_sets = [t for t in TOKEN_SETS if t in first["cascade"]]
    figure = panels(1, len(token_sets), [f"{t} tokens replaced" for t in token_sets],
                    "Accuracy under cascaded replacement of blocks s..L-1", shared_y=True)
    starts = first["cascade"]["starts"]
    colour = colours(results)
    dataset, backbone = labels(first)
    paper = [r for r in paper_rows("cascade_accuracy") if (r["dataset"], r["backbone"]) == (dataset, backbone)]
    for col, tokens in enumerate(token_sets, start=1):
        for name, r in results.items():
            figure.add_trace(go.Scatter(x=starts, y=[m["accuracy"] for m in r["cascade"][tokens]], mode="lines+markers",
                                        name=name, legendgroup=name, showlegend=col == 1, line={"color": colour[name]}),
                             row=1, col=col)
            theirs = [row for row in paper if row["tokens"] == tokens and r.get("sparsifier") in row]
            if theirs:
                figure.add_trace(go.Scatter(x=[int(row["start_layer"]) for row in theirs],
                                            y=[float(row[r["sparsifier"]]) for row in theirs], mode="lines",
                                            name=f"{name}: paper", legendgroup=f"{name} paper", showlegend=col == 1,
                                            line={"color": colour[name], "dash": "dot"}), row=1, col=col)
        figure.add_trace(go.Scatter(x=starts, y=[first["cascade"]["baseline"]] * len(starts), mode="lines",
                                    name="teacher", legendgroup="teacher", showlegend=col == 1,
                                    line={"color": "black", "dash": "dash"}), row=1, col=col)
    figure.update_xaxes(title_text="first replaced block s", dtick=1 if len(starts) <= 12 else 2)
    figure.update_yaxes(title_text=ACCURACY, col=1)
    return figure


def training_figure(logs: dict[str, list[dict]]) -> go.Figure:
    """Training curves per CLT from its log: the loss and the mean fraction of variance unexplained (1 - R²)."""
    figure = panels(1, 2, ["loss", "mean FVU over layers"], "Training")
    colour = colours(logs)
    for name, records in logs.items():
        steps = [r["step"] for r in records]
        line = {"color": colour[name]}
        figure.add_trace(go.Scatter(x=steps, y=[r["loss"] for r in records], mode="lines", name=name,
                                    legendgroup=name, line=line), row=1, col=1)
        figure.add_trace(go.Scatter(x=steps, y=[sum(r["fvu"]) / len(r["fvu"]) for r in records], mode="lines",
                                    name=name, legendgroup=name, showlegend=False, line=line), row=1, col=2)
    figure.update_yaxes(type="log")
    figure.update_yaxes(title_text="loss (log scale)", col=1)
    figure.update_yaxes(title_text="FVU = 1 − R² (log scale)", col=2)
    figure.update_xaxes(title_text="training step")
    return figure


def _lower_triangle(matrix: list[list[float]]) -> list[list[float | None]]:
    """C(s→l) with the entries above the diagonal (sources after their target) left empty."""
    n = len(matrix)
    return [[matrix[l][s] if s <= l else None for s in range(n)] for l in range(n)]


def _heatmap_trace(matrix: list[list[float]], show_scale: bool) -> go.Heatmap:
    """A lower-triangular C(s→l) heatmap on the shared 0-1 scale: rows are targets l, columns sources s."""
    n = len(matrix)
    return go.Heatmap(z=_lower_triangle(matrix), x=list(range(n)), y=list(range(n)), zmin=0, zmax=1,
                      colorscale="Viridis", showscale=show_scale, colorbar={"title": {"text": "C(s→l)"}},
                      hovertemplate="source %{x} → target %{y}: %{z:.3f}<extra></extra>")


def validated_contribution_heatmap(matrix: list[list[float]], title: str = "") -> go.Figure:
    """One C(s→l) heatmap, built and validated by plotly (what :func:`contribution_heatmap` reproduces)."""
    figure = go.Figure(_heatmap_trace(matrix, True))
    figure.update_layout(title=title, xaxis_title="source layer s", yaxis_title="target layer l", height=420, width=460,
                         yaxis={"autorange": "reversed"}, template="simple_white", font={"size": 13})
    return figure


@functools.lru_cache(maxsize=16)
def _heatmap_skeleton(n_layers: int) -> str:
    """The JSON of a validated n-layer heatmap, to be filled in."""
    return validated_contribution_heatmap([[0.0] * n_layers for _ in range(n_layers)], " ").to_json()


def contribution_heatmap(matrix: list[list[float]], title: str = "") -> go.Figure:
    """One C(s→l) heatmap (the app shows two per analysis): a figure validated once per size with this matrix and
    title filled in, unvalidated (plotly's validation of the template took 25 of an analysis's 27 ms per figure)."""
    figure = json.loads(_heatmap_skeleton(len(matrix)))
    figure["data"][0]["z"] = _lower_triangle(matrix)
    figure["layout"]["title"]["text"] = title
    return go.Figure(figure, _validate=False)  # plotly's own flag; the skeleton was validated


def reach_figure(norms: list[float], layer: int, replaced_from: int = 0) -> go.Figure:
    """A feature's reach: ||W_dec[s→l][f]|| for each target l >= s, the targets the cascade replaces in colour."""
    targets = list(range(layer, layer + len(norms)))
    figure = go.Figure(go.Bar(x=targets, y=norms, marker_color=[COLOURS[0] if t >= replaced_from else "#c7c7c7"
                                                                for t in targets]))
    figure.update_layout(title=f"Reach of a layer-{layer} feature", xaxis_title="target layer l",
                         yaxis_title="decoder row norm", height=320,
                         template="simple_white", font={"size": 13}, xaxis={"dtick": 1})
    return figure


def class_effect_figure(towards: list[tuple[str, float]], away: list[tuple[str, float]], where: str) -> go.Figure:
    """The classes a feature's direct effect pushes towards and away from (logit change per unit of code)."""
    rows = [*away, *towards[::-1]]  # drawn bottom to top: the strongest push towards on top
    figure = go.Figure(go.Bar(x=[v for _, v in rows], y=[n for n, _ in rows], orientation="h",
                              marker_color=[COLOURS[2] if v >= 0 else COLOURS[0] for _, v in rows]))
    figure.update_layout(title=f"Direct effect on the logits<br><sup>linearised at {where}</sup>", height=340,
                         xaxis_title="logit change per unit of code", template="simple_white", font={"size": 13},
                         margin={"l": 140})
    return figure


def contributions_figure(results: dict[str, dict]) -> go.Figure:
    """Figures 11-16: a row per CLT, a column per token group, one colour scale for every panel."""
    names = list(results)
    figure = panels(len(names), len(TOKEN_GROUPS), [f"{n} — {t}" for n in names for t in TOKEN_GROUPS],
                    "Cross-layer contribution scores C(s→l)")
    for row, name in enumerate(names, start=1):
        for col, tokens in enumerate(TOKEN_GROUPS, start=1):
            figure.add_trace(_heatmap_trace(results[name]["contributions"][tokens], row == 1 and col == 1),
                             row=row, col=col)
    figure.update_yaxes(autorange="reversed", dtick=1)
    figure.update_yaxes(title_text="target layer l", col=1)
    figure.update_xaxes(title_text="source layer s", dtick=1)
    return figure


def prompt_sensitivity_figure(results: dict, name: str) -> go.Figure:
    """Per-template accuracy of the teacher and of the surrogate (full cascade and last block), per token group:
    the figure behind prompt r."""
    figure = panels(1, len(TOKEN_GROUPS), [f"{name}, {t} tokens replaced" for t in TOKEN_GROUPS],
                    "Prompt sensitivity: accuracy with each prompt template alone", shared_y=True)
    n_layers = len(results["l0"])
    for col, tokens in enumerate(TOKEN_GROUPS, start=1):
        ranges = results["cascade"][tokens]
        teacher = ranges[0]["template_accuracy"]["teacher"]
        templates = list(range(len(teacher)))
        figure.add_trace(go.Scatter(x=templates, y=teacher, mode="lines+markers", name="teacher", legendgroup="teacher",
                                    showlegend=col == 1, line={"color": "black"}), row=1, col=col)
        for metrics, colour in zip((ranges[0], ranges[-1]), COLOURS):
            label = f"CLT in blocks {range_label(metrics['start'], n_layers)}"
            figure.add_trace(go.Scatter(x=templates, y=metrics["template_accuracy"]["surrogate"], mode="lines+markers",
                                        name=f"{label} (r = {metrics['prompt_r']:.3f}, {tokens})",
                                        line={"color": colour}), row=1, col=col)
    figure.update_xaxes(title_text="prompt template (index)", dtick=1 if len(teacher) <= 20 else 4)
    figure.update_yaxes(title_text=ACCURACY, col=1)
    return figure


def layer_terms_figures(results: dict[str, dict]) -> dict[str, go.Figure]:
    """``layer_terms_retention``: accuracy against the number m of kept sources per ranking (random: mean ± sd over
    the draws), with the teacher and the all-terms replacement; ``layer_terms_removal``: the accuracy drop of
    removing each source against its C(s→L-1)."""
    names = list(results)
    tokens = list(next(iter(results.values()))["tokens"])
    titles = [f"{n} — {t}" for n in names for t in tokens]
    retention = panels(len(names), len(tokens), titles, "Keeping only the top-m source layers of the final "
                       "representation", shared_y=True)
    removal = panels(len(names), len(tokens), titles, "Removing one source layer: accuracy drop against its "
                     "contribution score", shared_y=True)
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
                                               showlegend=first, line={"color": RANKING_COLOURS[ranking]}),
                                    row=row, col=col)
            ms = list(range(1, result["target"] + 2))
            for value, label, dash in ((result["baseline"], "teacher", "dash"),
                                       (r["full"]["accuracy"], "all terms", "dot")):
                retention.add_trace(go.Scatter(x=ms, y=[value] * len(ms), mode="lines", name=label, legendgroup=label,
                                               showlegend=first, line={"color": "black", "dash": dash}),
                                    row=row, col=col)
            single = sorted((p for p in r["rows"] if p["ranking"] == "single"), key=lambda p: p["layer"])
            removal.add_trace(go.Scatter(x=[r["dataset_contributions"][p["layer"]] for p in single],
                                         y=[r["full"]["accuracy"] - p["accuracy"] for p in single],
                                         text=[f"s = {p['layer']}" for p in single], mode="markers+text",
                                         textposition="top center", showlegend=False, marker={"color": COLOURS[0]}),
                              row=row, col=col)
    retention.update_xaxes(title_text="source layers kept, m", dtick=1)
    retention.update_yaxes(title_text=ACCURACY, col=1)
    removal.update_xaxes(title_text="C(s→L-1), dataset")
    removal.update_yaxes(title_text="accuracy drop (points)", col=1)
    return {"layer_terms_retention": retention, "layer_terms_removal": removal}
