"""Time one full analysis as the app does it (all panels: predictions with and without replacement,
contributions, retrieval at every layer, reconstruction, and the rendering of galleries and heatmaps),
the Features tab (an image's ranked features, a feature card, one intervention, each rendered), the Graph tab
(one image's attribution graph, start 0, CLS tokens: built, pruned, exported and drawn, in a process of its own)
and the peak resident memory, for the tiny-CLIP bundle and for a bundle of the true ViT-B/32 size.

The true-size bundle has random weights: an open_clip ViT-B-32-quickgelu teacher, a CLT with
F = 12288 and k = 128 (849M parameters), compact retrieval indexes of 50k images for all 12 layers
(synthetic codes of the true sparsity, from bench_retrieval.py; one index per token set, hard-linked
under each layer's name), a feature store of the true shape (random values) and 50k thumbnails. It is
built once into --cache (about 6 GB, a few minutes). Each bundle is measured in a fresh process: its
peak is that process's own VmHWM ("peak RSS"); "ru_maxrss" is what getrusage(RUSAGE_CHILDREN) reports
for it in the parent, the figure this script used to print, which a child started by fork+exec
inherits from its parent (13.8 GB once, after the parent had built the true-size bundle).

    python scripts/bench_app.py [--tiny-bundle DIR] [--cache DIR] [--repeats 5] [--skip-true-size]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from app_process import peak_rss_gb
from bench_retrieval import compact_index, synthetic_descriptors
from PIL import Image

from clt_explorer import CLTConfig, CrossLayerTranscoder
from clt_explorer.app.analysis import Explorer
from clt_explorer.app.features import feature_card, image_features, intervene
from clt_explorer.app.graph import image_graph
from clt_explorer.app.graph_panel import graph_figure
from clt_explorer.app.ui import UploadLimits, build_app
from clt_explorer.assets.bundle import LOCAL_TEACHER, Bundle
from clt_explorer.assets.default_bundle import default_bundle
from clt_explorer.data.resources import cifar100_classnames, cifar_templates
from clt_explorer.model.zeroshot import ZeroShotClassifier
from clt_explorer.retrieval.build import COMPACT_DEFAULTS
from clt_explorer.retrieval.compact import FORMAT
from clt_explorer.retrieval.features import FeatureStatistics
from clt_explorer.retrieval.index import RetrievalIndex
from clt_explorer.retrieval.thumbnails import build_thumbnails
from clt_explorer.storage import write_json
from clt_explorer.training.tiny_clip import save_open_clip_folder

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path.home() / ".cache" / "clt-explorer" / "bench-true-size"
N_IMAGES = 50_000


class RandomColours(torch.utils.data.Dataset):
    """Plain images of random colours with random labels: the thumbnails of the true-size bundle."""

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        self.colours, self.labels = rng.integers(0, 255, (n, 3)), rng.integers(0, 100, n).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return Image.new("RGB", (96, 96), tuple(int(c) for c in self.colours[i])), self.labels[i]


def build_true_size_bundle(folder: Path) -> Path:
    """A random-weight bundle with the sizes of a real ViT-B/32 one (skipped when present with indexes of this
    version's format; rebuilt otherwise)."""
    if Bundle.exists(folder) and RetrievalIndex.exists(Bundle.load(folder).retrieval_dir("relu_topk")):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    start = time.time()
    torch.manual_seed(0)
    bundle = Bundle.create(folder, "true-size-random", {"model": LOCAL_TEACHER},
                           {"name": "cifar100", "classnames": cifar100_classnames(), "templates": cifar_templates()})
    arch = "ViT-B-32-quickgelu"
    model = open_clip.create_model(arch)
    preprocess = {"size": 224, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    save_open_clip_folder(model, open_clip.get_model_config(arch), preprocess, bundle.teacher_dir)
    teacher = bundle.load_teacher()
    clt = CrossLayerTranscoder(CLTConfig(12, 768, 16, "relu_topk", 128, teacher=teacher.identity))
    clt.save_pretrained(bundle.clt_dir("relu_topk"))
    del clt
    print(f"teacher and CLT written ({time.time() - start:.0f} s); generating {N_IMAGES} synthetic descriptors")
    descriptors = synthetic_descriptors(N_IMAGES, 12288, 128, 49, seed=0)
    retrieval = bundle.retrieval_dir("relu_topk")
    files = {t: [f"{t}_{layer}.compact" for layer in range(12)] for t in ("cls", "patches")}
    for tokens, names in files.items():
        with tempfile.TemporaryDirectory() as workdir:
            compact_index(descriptors[tokens], COMPACT_DEFAULTS["budget"], Path(workdir)).save(retrieval / names[0])
        for name in names[1:]:  # the same bytes under every layer's name: mapped once per layer, as real ones are
            shutil.copytree(retrieval / names[0], retrieval / name, copy_function=os.link)
    del descriptors
    write_json(retrieval / "manifest.json", {"format": FORMAT, "mode": "compact", "n_images": N_IMAGES,
                                             "n_layers": 12, "n_features": 12288, "settings": COMPACT_DEFAULTS,
                                             "files": files})
    synthetic_feature_statistics(12, 12288, 49, 768, N_IMAGES).save(bundle.features_dir("relu_topk"), (7, 7))
    build_thumbnails(RandomColours(N_IMAGES), range(N_IMAGES), bundle.thumbnails_dir, size=96, progress=True)
    bundle.set_thumbnails()
    ZeroShotClassifier.build(teacher, bundle.classnames, bundle.templates).save(bundle.zeroshot_file, teacher)
    bundle.set_zeroshot()
    bundle.add_clt("relu_topk")
    print(f"true-size bundle built in {time.time() - start:.0f} s")
    return folder


def synthetic_feature_statistics(n_layers: int, n_features: int, n_patches: int, d_model: int,
                                 n_images: int) -> FeatureStatistics:
    """Statistics of the true shape with random values (every top-N slot filled)."""
    g = torch.Generator().manual_seed(0)
    s = FeatureStatistics(n_layers, n_features, n_patches, d_model)
    s.n_images, s.n_tokens = n_images, n_images * (n_patches + 1)
    for count in (s.token_count, s.image_count, s.cls_count):
        count.copy_(torch.randint(0, n_images // 20, count.shape, generator=g))
    s.sum.copy_(torch.rand(s.sum.shape, generator=g, dtype=torch.float64) * s.token_count)
    s.max_abs.copy_(torch.rand(s.max_abs.shape, generator=g) * 5)
    s.top_ids.copy_(torch.randint(0, n_images, s.top_ids.shape, generator=g))
    s.top_peak.copy_(torch.rand(s.top_peak.shape, generator=g) * 5)
    s.maps.copy_(torch.randint(-127, 128, s.maps.shape, generator=g, dtype=torch.int8))
    s.scales.copy_(s.top_peak / 127)
    s.final_sum.copy_(torch.randn(d_model, generator=g, dtype=torch.float64) * n_images)
    return s


def bundle_bytes(root: Path) -> int:
    """The bytes of every file in a bundle (a hard-linked file counted under each of its names)."""
    return sum(path.stat().st_size for path in Path(root).rglob("*") if path.is_file())


def random_image(seed: int) -> Image.Image:
    """An upload of random pixels, 320 x 240, the same for the same seed."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (240, 320, 3), dtype=np.uint8))


def measure(bundle_path: str, repeats: int) -> dict:
    """In this process: open the bundle as the app does, then time full analyses and rendering."""
    torch.set_num_threads(2)
    start = time.time()
    explorer = Explorer(Bundle.load(bundle_path))
    app = build_app(explorer, UploadLimits())
    name = explorer.clt_names[0]
    explorer.clt(name), explorer.index(name)
    load_s = time.time() - start
    images = [random_image(i) for i in range(repeats + 1)]
    times, inside, assembling, rendering = [], [], [], []
    for i, image in enumerate(images):
        began = time.perf_counter()
        model = explorer.model_pass(image, name, "all", 0)  # what runs inside @spaces.GPU on a Space
        model_s = time.perf_counter() - began
        analysis = explorer.assemble(model, explorer.n_layers - 1, 3)  # the searches, the quality, the ranking
        assembled = time.perf_counter()
        app.render(image, analysis, "cls")
        if i:  # the first one warms up
            times.append(time.perf_counter() - began)
            inside.append(model_s)
            assembling.append(assembled - began - model_s)
            rendering.append(time.perf_counter() - assembled)
    store = explorer.feature_store(name)
    return {"load_s": load_s, "analysis_s": float(np.median(times)), "analysis_max_s": max(times),
            "gpu_function_s": float(np.median(inside)), "gpu_share": float(np.median(np.divide(inside, times))),
            "assemble_s": float(np.median(assembling)), "render_s": float(np.median(rendering)),
            **measure_features(explorer, app, name, images), "peak_rss_gb": peak_rss_gb(),
            "clt_dtype": str(explorer.clt(name).W_enc.dtype).replace("torch.", ""),
            "feature_store_bytes": store.nbytes if store is not None else None,
            "bundle_bytes": bundle_bytes(bundle_path)}


def measure_features(explorer: Explorer, app, name: str, images: list) -> dict:
    """Median seconds, rendering included, of the Features tab's ranking (start 0, all tokens), a feature card
    of the image's top feature of the middle layer (or the nearest layer with one), and ablating it (the card's
    slider at 0)."""
    panel, ranking, card, edit = app.features, [], [], []
    for i, image in enumerate(images):
        began = time.perf_counter()
        ranked = image_features(explorer, image, name, "all", 0)
        panel.render_features(ranked, image, explorer)
        ranked_s = time.perf_counter() - began
        middle = explorer.n_layers // 2
        layer = min((layer for layer, rows in enumerate(ranked.layers) if rows), key=lambda i: abs(i - middle))
        feature = ranked.layers[layer][0].feature
        began = time.perf_counter()
        panel.render_card(feature_card(explorer, name, layer, feature, image, "all", 0), image, explorer, 0)
        card_s = time.perf_counter() - began
        began = time.perf_counter()
        panel.render_intervention(intervene(explorer, image, name, {(layer, feature): 0.0}, "all", 0),
                                  f"{layer}:{feature}", 0.0)
        if i:
            ranking.append(ranked_s), card.append(card_s), edit.append(time.perf_counter() - began)
    return {"features_s": float(np.median(ranking)), "feature_card_s": float(np.median(card)),
            "intervention_s": float(np.median(edit))}


def measure_graph(bundle_path: str, repeats: int) -> dict:
    """In this process: the Graph tab's work for ``repeats`` images after a warm-up (start 0, CLS tokens, the
    replaced model's top-1): the graph built, pruned and exported, then drawn; median seconds of each, and this
    process's own peak (the teacher and the CLT loaded as the app loads them, nothing else)."""
    torch.set_num_threads(2)
    explorer = Explorer(Bundle.load(bundle_path))
    name = explorer.clt_names[0]
    built, drawn, nodes = [], [], 0
    for i in range(repeats + 1):
        image = random_image(100 + i)
        began = time.perf_counter()
        graph = image_graph(explorer, image, name, "cls", 0)
        between = time.perf_counter()
        graph_figure(graph)
        if i:
            built.append(between - began), drawn.append(time.perf_counter() - between)
            nodes = graph.n_nodes
    return {"graph_s": float(np.median(built)), "graph_draw_s": float(np.median(drawn)), "graph_nodes": nodes,
            "graph_peak_gb": peak_rss_gb()}


def measure_in_subprocess(bundle: Path, repeats: int) -> dict:
    """:func:`measure` and :func:`measure_graph`, each in a fresh process, with what the parent's getrusage says of
    the first one's peak."""
    results = []
    for mode in ("--measure", "--measure-graph"):
        done = subprocess.run([sys.executable, __file__, mode, str(bundle), "--repeats", str(repeats)],
                              capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if mode == "--measure":
            results[-1]["ru_maxrss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {**results[0], **results[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-bundle", help="default: the app's default bundle under checkpoints/ (built if absent)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the true-size bundle is built once")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-true-size", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--measure-graph", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.repeats)))
        return
    if args.measure_graph:
        print(json.dumps(measure_graph(args.measure_graph, args.repeats)))
        return
    tiny = Path(args.tiny_bundle) if args.tiny_bundle else default_bundle(ROOT / "checkpoints").root
    rows = {"tiny CLIP": measure_in_subprocess(tiny, args.repeats)}
    if not args.skip_true_size:
        rows["ViT-B/32 size"] = measure_in_subprocess(build_true_size_bundle(Path(args.cache)), args.repeats)
    print(f"\n{'bundle':14} {'load s':>7} {'analysis s':>11} {'max s':>7} {'in GPU fns':>11} {'assemble s':>11} "
          f"{'render s':>9} {'features s':>11} "
          f"{'card s':>7} {'edit s':>7} {'store MB':>9} {'bundle MB':>10} {'peak RSS GB':>12} {'ru_maxrss GB':>13} "
          f"{'CLT dtype':>10} {'graph s':>8} {'draw s':>7} {'nodes':>6} {'graph peak GB':>14}")
    for name, r in rows.items():
        print(f"{name:14} {r['load_s']:7.1f} {r['analysis_s']:11.3f} {r['analysis_max_s']:7.3f} "
              f"{100 * r['gpu_share']:10.0f}% {r['assemble_s']:11.3f} {r['render_s']:9.3f} {r['features_s']:11.3f} "
              f"{r['feature_card_s']:7.3f} "
              f"{r['intervention_s']:7.3f} {(r['feature_store_bytes'] or 0) / 1e6:9.1f} "
              f"{r['bundle_bytes'] / 1e6:10.1f} "
              f"{r['peak_rss_gb']:12.2f} {r['ru_maxrss_gb']:13.2f} {r['clt_dtype']:>10} {r['graph_s']:8.3f} "
              f"{r['graph_draw_s']:7.3f} {r['graph_nodes']:6d} {r['graph_peak_gb']:14.2f}")
    print("in GPU fns: the share of an analysis (with rendering) spent in the model pass, what @spaces.GPU wraps; "
          "assemble: the rest of the analysis (index searches, quality, ranking); render: the panels' values; "
          "features / card / edit: the Features tab's ranking, a card, one ablation, each rendered; "
          "peak RSS: the measuring process's own VmHWM; ru_maxrss: the parent's getrusage of its children, "
          "inherited across fork+exec (not the process's own figure); graph: one image's attribution graph (start 0, "
          "CLS tokens) built, pruned and exported / drawn, and the peak of a process doing only that")
    true = rows.get("ViT-B/32 size", {})
    tiny_row = rows["tiny CLIP"]
    print(json.dumps({"analysis_s_tiny": tiny_row["analysis_s"], "analysis_s_true_size": true.get("analysis_s"),
                      "gpu_share_tiny": tiny_row["gpu_share"], "gpu_share_true_size": true.get("gpu_share"),
                      "feature_card_s": true.get("feature_card_s"), "intervention_s": true.get("intervention_s"),
                      "feature_store_bytes": true.get("feature_store_bytes"), "bundle_bytes": true.get("bundle_bytes"),
                      "peak_rss_gb": true.get("peak_rss_gb"), "peak_rss_gb_tiny": tiny_row["peak_rss_gb"],
                      "graph_s": true.get("graph_s"), "graph_peak_gb": true.get("graph_peak_gb"),
                      "graph_s_tiny": tiny_row["graph_s"],
                      "details": rows}))


if __name__ == "__main__":
    main()
