"""The CLT's top-k on a CPU at ViT-B/32 size: torch's own against its replay (``clt_explorer.model.heap_topk``).

First the selection alone, on the true-size bench bundle's pre-activations (the teacher's x_l of two images, 100
tokens, at four layers): milliseconds each way, whether the indices are the same in the same order, and the share of
rows whose k-th value ties with another. Then whole analyses as ``bench_app.py`` times them (start 0, all tokens,
searches and rendering included) in one process, alternating image by image between the two selections: the speed of
this machine changes by the minute, and from one process to the next with how much of the CLT lands in huge pages,
more than the top-k's share. Medians after a warm-up.

    python scripts/bench_topk.py [--cache DIR] [--images 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from bench_app import DEFAULT_CACHE, build_true_size_bundle, random_image

from clt_explorer.app.analysis import Explorer
from clt_explorer.app.ui import UploadLimits, build_app
from clt_explorer.assets.bundle import Bundle
from clt_explorer.model import heap_topk

LAYERS = (0, 3, 6, 11)
WARM_UP = 4  # analyses left out of the medians (the first compiles the replay)


def median_ms(run, repeats: int = 50) -> float:
    run()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return 1e3 * float(np.median(times))


def selection_alone(explorer: Explorer, name: str) -> list[dict]:
    """Per layer of :data:`LAYERS`: torch's and the replay's milliseconds, whether they agree, the rows tied at k."""
    clt = explorer.clt(name)
    k = clt.config.k
    pixels = torch.cat([explorer.pixels(random_image(seed)) for seed in range(2)])
    xs = explorer.teacher.capture(pixels).xs
    rows = []
    for layer in LAYERS:
        scores = clt.preactivations(layer, xs[layer]).reshape(-1, clt.config.n_features)
        expected = scores.topk(k, dim=-1, sorted=False).indices
        kth = scores.float().topk(k, dim=-1).values[:, -1:]
        rows.append({"layer": layer, "rows": scores.shape[0],
                     "torch_ms": median_ms(lambda: scores.topk(k, dim=-1, sorted=False)),
                     "replay_ms": median_ms(lambda: heap_topk.top_indices(scores, k)),
                     "same": torch.equal(heap_topk.top_indices(scores, k), expected),
                     "tied_rows": float(((scores.float() == kth).sum(-1) > 1).float().mean())})
    return rows


def alternating_analyses(explorer: Explorer, name: str, n_images: int) -> dict[str, dict[str, float]]:
    """Median seconds of the model pass and of the whole analysis with each selection, image by image in turn."""
    app = build_app(explorer, UploadLimits())
    replays = heap_topk.replays
    modes = {"torch": lambda scores, k: False, "replay": replays}
    times = {mode: {"model_pass_s": [], "analysis_s": []} for mode in modes}
    try:
        for i in range(n_images):
            image = random_image(i)
            mode = list(modes)[i % 2]
            heap_topk.replays = modes[mode]
            began = time.perf_counter()
            model = explorer.model_pass(image, name, "all", 0)
            passed = time.perf_counter()
            app.render(image, explorer.assemble(model, explorer.n_layers - 1, 3), "cls")
            if i >= WARM_UP:
                times[mode]["model_pass_s"].append(passed - began)
                times[mode]["analysis_s"].append(time.perf_counter() - began)
    finally:
        heap_topk.replays = replays
    return {mode: {key: float(np.median(values)) for key, values in per_mode.items()} for mode, per_mode in
            times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the true-size bundle is built once")
    parser.add_argument("--images", type=int, default=64, help="analyses, half with each selection")
    args = parser.parse_args()
    torch.set_num_threads(2)
    explorer = Explorer(Bundle.load(build_true_size_bundle(Path(args.cache))))
    name = explorer.clt_names[0]
    explorer.clt(name), explorer.index(name)
    with torch.no_grad():
        alone = selection_alone(explorer, name)
    analyses = alternating_analyses(explorer, name, args.images)
    print(f"{'layer':>5} {'rows':>5} {'torch ms':>9} {'replay ms':>10} {'same':>5} {'rows tied at k':>15}")
    for row in alone:
        print(f"{row['layer']:5d} {row['rows']:5d} {row['torch_ms']:9.2f} {row['replay_ms']:10.2f} "
              f"{str(row['same']):>5} {row['tied_rows']:15.2f}")
    n = (args.images - WARM_UP) // 2
    print(f"\n{'medians of ' + str(n) + ' each':22} {'torch':>7} {'replay':>7}")
    for key in ("model_pass_s", "analysis_s"):
        print(f"{key:22} {analyses['torch'][key]:7.3f} {analyses['replay'][key]:7.3f}")
    print(json.dumps({"selection_alone": alone, "analyses": analyses}))


if __name__ == "__main__":
    main()
