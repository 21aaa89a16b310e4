"""Evaluation results -> the paper's tables: CSV in the columns of the paper's files, markdown in the layout of its
tables, and our numbers beside the paper's (``data/resources/paper_*.csv``, tables 5-23 of the supplement)."""

from __future__ import annotations

import csv
import io
from importlib.resources import files

from ..model.sparsifiers import sparsifier_class
from ..model.tokens import TOKEN_GROUPS, TOKEN_SETS
from . import layer_terms

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


def range_label(start: int, n_layers: int) -> str:
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
            row = {"layers": range_label(metrics["start"], n_layers), "tokens": tokens}
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


