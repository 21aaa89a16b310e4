"""How class-consistent layer-wise retrieval is: for held-out images of a bundle's dataset, the share of
the top-K retrieved training images that have the query's class, per CLT, token set and layer.

    python scripts/retrieval_quality.py --bundle checkpoints/synthetic-tiny-clip [--queries 500] [--k 3]
"""

from __future__ import annotations

import argparse
import json

from clt_explorer.assets.bundle import open_bundle
from clt_explorer.assets.evaluation_runs import bundle_test_split
from clt_explorer.retrieval.quality import same_class_rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle folder or hf://owner/repo")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=3)
    args = parser.parse_args()
    bundle = open_bundle(args.bundle)
    teacher = bundle.load_teacher()
    store = bundle.load_thumbnails()
    test = bundle_test_split(bundle)
    results = {}
    for name in bundle.clt_names:
        clt = bundle.load_clt(name, teacher)
        index = bundle.load_index(name, len(store))
        results[name] = same_class_rates(teacher, clt, index, store.labels, test, args.queries, args.k)
    layers = len(next(iter(results.values()))["cls"])
    print(f"same-class rate of the top-{args.k} over {min(args.queries, len(test))} held-out images "
          f"(chance {1 / len(bundle.classnames):.3f})")
    print(f"{'CLT':10} {'tokens':8} " + " ".join(f"{'layer ' + str(i):>8}" for i in range(layers)))
    for name, rates in results.items():
        for tokens, per_layer in rates.items():
            print(f"{name:10} {tokens:8} " + " ".join(f"{r:8.3f}" for r in per_layer))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
