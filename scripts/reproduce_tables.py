"""Reproduce the paper's tables and figures for one bundle and lay them beside the paper's numbers.

Writes into --out report.html (one page that opens offline: plotly.js embedded once, every figure, table and
retrieval grid) and the pieces: cascade_accuracy.csv (the columns of the paper's tables 6-23), faithfulness.csv
(table 5's columns, for the primary CLT) and faithfulness_<clt>.csv, reconstruction.csv,
paper_comparison.csv and paper_faithfulness_comparison.csv when the bundle matches a configuration of
the paper, layer_terms.csv (the remove / retain experiment on the final representation), tables.md,
results.json and layer_terms.json, plotly figures (HTML beside one plotly.min.js, and PNG and SVG when a
Chromium-based browser is found) of reconstruction, contributions, cascaded replacement, prompt sensitivity
and the layer-term curves, and static retrieval grids
like figures 4 and 5 (grid_<clt>_<n>_<cls|patches>.png: the top-3 training images per layer for a
few of the bundle's example images, by exact search).

    python scripts/reproduce_tables.py --bundle checkpoints/synthetic-tiny-clip --out results/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clt_explorer.assets.bundle import open_bundle
from clt_explorer.assets.evaluation_runs import (
    bundle_about,
    evaluate_bundle,
    layer_terms_bundle,
    write_retrieval_grids,
)
from clt_explorer.evaluation.layer_terms import summary_lines
from clt_explorer.evaluation.report import write_report
from clt_explorer.evaluation.tables import markdown_table, paper_comparison
from clt_explorer.storage import write_json
from clt_explorer.training.train import default_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle folder or hf://owner/repo")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-images", type=int, help="evaluate on the first N held-out images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--primary", help="CLT name of faithfulness.csv (default: the bundle's first)")
    parser.add_argument("--force", action="store_true", help="re-evaluate even when the bundle holds results")
    parser.add_argument("--grid-images", type=int, default=3, help="example images with retrieval grids (0: none)")
    parser.add_argument("--start", type=int, help="first replaced block of the layer-term experiment (default: the "
                        "last block, the final representation)")
    args = parser.parse_args()
    start = time.time()
    bundle = open_bundle(args.bundle)
    device = args.device or default_device()
    results = evaluate_bundle(bundle, None, args.max_images, args.batch_size, device, args.force)
    terms = layer_terms_bundle(bundle, None, args.max_images, args.batch_size, device, args.force, start=args.start)
    out = Path(args.out)
    write_json(out / "results.json", results)
    write_json(out / "layer_terms.json", terms)
    grids = write_retrieval_grids(bundle, out, n_queries=args.grid_images, batch_size=args.batch_size, device=device)
    written = [*grids, *write_report(results, out, args.primary, terms, bundle_about(bundle), grids)]
    comparison = paper_comparison(results)
    if comparison:
        print("Cascade accuracy (%), ours beside the paper's:\n")
        print(markdown_table(comparison, list(comparison[0])))
    else:
        first = next(iter(results.values()))
        print(f"No configuration of the paper matches ({first.get('dataset')}, {first.get('backbone')}): "
              f"nothing to compare.")
    print("\n".join(line for name, r in terms.items() for tokens in r["tokens"]
                    for line in summary_lines(name, tokens, r, r["baseline"])))
    print(f"\n{len(written) + 2} files in {out} in {time.time() - start:.0f} s")
    print((out / "tables.md").read_text())
    print(json.dumps({"seconds": round(time.time() - start, 1), "files": len(written) + 2}))


if __name__ == "__main__":
    main()
