"""Evaluate the CLTs of a bundle (or one CLT folder on a bundle's teacher and data) and write the tables
and figures: reconstruction per layer, cascade accuracy for every start and token set, faithfulness,
contribution heatmaps.

    python scripts/evaluate.py --bundle checkpoints/synthetic-tiny-clip
    python scripts/evaluate.py --bundle DIR --clt relu_topk --max-images 2000 --force
    python scripts/evaluate.py --bundle DIR --clt path/to/other/clt --out results/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clt_explorer.assets.bundle import open_bundle
from clt_explorer.assets.evaluation_runs import evaluate_bundle
from clt_explorer.evaluation.report import write_report
from clt_explorer.training.train import default_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle folder or hf://owner/repo")
    parser.add_argument("--clt", nargs="+", help="CLT names in the bundle, or CLT folders (default: all the bundle's)")
    parser.add_argument("--max-images", type=int, help="evaluate on the first N held-out images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--force", action="store_true", help="re-evaluate even when results exist")
    parser.add_argument("--out", help="folder for tables and figures (default: BUNDLE/evaluation)")
    args = parser.parse_args()
    bundle = open_bundle(args.bundle)
    results = evaluate_bundle(bundle, args.clt, args.max_images, args.batch_size, args.device or default_device(),
                              args.force)
    out = Path(args.out) if args.out else bundle.root / "evaluation"
    for path in write_report(results, out):
        print(path)


if __name__ == "__main__":
    main()
