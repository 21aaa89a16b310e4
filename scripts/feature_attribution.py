"""Is the Features tab's attribution faithful? On a bundle's held-out images, per CLT and layer: ablate the image's
top-n features of that layer by direct attribution, then its top-n by total effect (the attribution graph's
linearisation: every path through attention and later features), then n random active features of the same layer
(active at the CLS token in the replaced pass, drawn uniformly, the top ones not excluded), and compare how much
each ablation lowers the replaced model's predicted-class logit. Uses the app's own functions (``image_features``,
``intervene``), with the always-on filter off. Prints one table per start layer of the cascade and a JSON line;
--out writes the rows.

    python scripts/feature_attribution.py --bundle checkpoints/synthetic-tiny-clip --max-images 300
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

from tqdm import tqdm

from clt_explorer.app.analysis import Explorer
from clt_explorer.app.features import DIRECT, TOTAL, image_features, intervene
from clt_explorer.assets.bundle import open_bundle
from clt_explorer.assets.evaluation_runs import bundle_test_split
from clt_explorer.evaluation.tables import markdown_table
from clt_explorer.model.tokens import CLS, PATCHES, TOKEN_SETS

RANKED = (DIRECT, TOTAL)


def ablation_drops(explorer: Explorer, image, clt: str, tokens: str, start: int, n: int,
                   rng: random.Random) -> list[dict]:
    """Per layer with at least n features active at the CLS token: the drops after ablating its top-n features by
    direct attribution, by total effect, and n random active ones; a drop is the predicted logit's decrease."""
    ranked = {r: image_features(explorer, image, clt, tokens, start, per_layer=n, max_cls_rate=None, ranking=r)
              for r in RANKED}
    pixels = explorer.pixels(image)
    replaced = explorer.replaced_pass(pixels, clt, tokens, start, ranked[DIRECT].kept)

    def drop(chosen: list[int], layer: int) -> float:
        return -intervene(explorer, image, clt, {(layer, f): 0.0 for f in chosen}, tokens, start).logit_change

    drops = []
    for layer in range(explorer.n_layers):
        codes = replaced.codes[layer].take_tokens(slice(0, 1)).dense()[0, 0]
        active = codes.nonzero()[:, 0].tolist()
        if len(active) < n:
            continue
        drops.append({"layer": layer, **{r: drop([row.feature for row in ranked[r].layers[layer]], layer)
                                         for r in RANKED},
                      "random": drop(rng.sample(active, n), layer)})
    return drops


def summarise(records: list[dict]) -> list[dict]:
    """Mean drops and the shares of cases (image, layer) where one ablation lowers the logit more than another, per
    (CLT, start, layer), each (CLT, start) closed by a row over all its layers (layer "all")."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["clt"], r["start"]), []).append(r)
    rows = []
    for (clt, start), rs in groups.items():
        layers = sorted({r["layer"] for r in rs})
        for layer, cases in [*((i, [r for r in rs if r["layer"] == i]) for i in layers), ("all", rs)]:
            def share(better: str, worse: str) -> float:
                return round(sum(r[better] > r[worse] for r in cases) / len(cases), 3)

            rows.append({"clt": clt, "start": start, "layer": layer, "cases": len(cases),
                         **{f"mean drop, {k}": round(sum(r[k] for r in cases) / len(cases), 4)
                            for k in (*RANKED, "random")},
                         "direct > random": share(DIRECT, "random"), "total > random": share(TOTAL, "random"),
                         "total > direct": share(TOTAL, DIRECT), "direct > total": share(DIRECT, TOTAL)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle folder or hf://owner/repo")
    parser.add_argument("--clt", action="append", help="a CLT's name (repeatable; default: all)")
    parser.add_argument("--max-images", type=int, default=300, help="the first N held-out images")
    parser.add_argument("--n", type=int, default=5, help="features ablated at once")
    parser.add_argument("--starts", default="last,0", help="first replaced blocks, comma-separated ('last' = L-1)")
    parser.add_argument("--tokens", default=CLS, choices=[t for t in TOKEN_SETS if t != PATCHES])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="CSV of the per-image records")
    args = parser.parse_args()
    began = time.time()
    bundle = open_bundle(args.bundle)
    explorer = Explorer(bundle)
    names = args.clt or explorer.clt_names
    starts = [explorer.n_layers - 1 if s == "last" else int(s) for s in args.starts.split(",")]
    test = bundle_test_split(bundle)
    images = [test[i][0] for i in range(min(args.max_images, len(test)))]
    rng = random.Random(args.seed)
    records = []
    for name in names:
        for start in starts:
            for index, image in enumerate(tqdm(images, desc=f"{name}, start {start}")):
                for drops in ablation_drops(explorer, image, name, args.tokens, start, args.n, rng):
                    records.append({"clt": name, "start": start, "image": index, **drops})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    rows = summarise(records)
    print(f"Ablating the top-{args.n} features of a layer by direct attribution, by total effect, and {args.n} random "
          f"active ones, tokens {args.tokens}, {len(images)} held-out images of {bundle.name}:\n")
    print(markdown_table(rows, list(rows[0])))
    overall = [r for r in rows if r["layer"] == "all"]
    print(json.dumps({"seconds": round(time.time() - began, 1), "images": len(images), "overall": overall,
                      "layers": [r for r in rows if r["layer"] != "all"]}))


if __name__ == "__main__":
    main()
