"""How many held-out images a second a CLT's evaluation measures (``evaluate_clt``: reconstruction, contributions and
every cascade s -> L-1 of every token set), per sparsifier, on a random-weight teacher of the paper rehearsal's shapes.

The evaluation is the one stage of a bundle that runs many passes per image: for each of the three token sets and
each start s, the teacher's blocks s..L-1 with the CLT in place of their MLPs. Its teacher is a random open_clip model
(``--shape``: the rehearsal's ``tiny`` or ``vit-b-32``) loaded through ``local-dir:``; its CLTs start as training
starts (input scales, decoder bias and JumpReLU's thresholds from a captured batch); its images are generated shapes.
It prints a table and one JSON line.

    python scripts/bench_evaluate.py [--shape vit-b-32 --expansion 16 --k 128] [--images 8] [--batch-size 8]
                                     [--sparsifiers relu_topk,jumprelu]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from rehearse_paper import teacher_config

from clt_explorer import CLTConfig, CrossLayerTranscoder
from clt_explorer.data.synthetic import SyntheticShapes
from clt_explorer.evaluation.evaluate import evaluate_clt
from clt_explorer.model.teacher import LOCAL_DIR, Teacher
from clt_explorer.model.zeroshot import ZeroShotClassifier
from clt_explorer.training.tiny_clip import save_open_clip_folder
from clt_explorer.training.train import default_device, initialize_from_data


def started_clt(teacher: Teacher, sparsifier: str, expansion: int, k: int, pixels: torch.Tensor
                ) -> CrossLayerTranscoder:
    """A CLT as training starts it: random weights, then the data-dependent start from ``pixels``' activations."""
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(teacher.n_layers, teacher.d_model, expansion, sparsifier, k),
                               device=teacher.device)
    capture = teacher.capture(pixels)
    initialize_from_data(clt, capture.xs.flatten(1, 2), capture.ys.flatten(1, 2))
    return clt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "vit-b-32"], default="vit-b-32")
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--images", type=int, default=8, help="held-out images evaluated per sparsifier")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sparsifiers", default="relu_topk,jumprelu")
    args = parser.parse_args(argv)
    device = default_device()
    model_cfg, preprocess = teacher_config(args.shape)
    data = SyntheticShapes("test", args.images)
    with tempfile.TemporaryDirectory(prefix="clt-bench-evaluate-") as folder:
        torch.manual_seed(0)
        save_open_clip_folder(open_clip.CLIP(**model_cfg), model_cfg, preprocess, folder)
        teacher = Teacher.load(LOCAL_DIR + str(Path(folder).resolve()), device=device)
    classifier = ZeroShotClassifier.build(teacher, data.classnames, data.templates)
    start_pixels = teacher.preprocess_images([data[i][0] for i in range(min(args.images, 8))])
    print(f"{args.shape} teacher ({teacher.n_layers} layers, d = {teacher.d_model}), F = {args.expansion} d, "
          f"k = {args.k}, {args.images} images in batches of {args.batch_size}, on {device}\n"
          f"{'sparsifier':>10} {'seconds':>8} {'images/s':>9}")
    rows = []
    for sparsifier in args.sparsifiers.split(","):
        clt = started_clt(teacher, sparsifier, args.expansion, args.k, start_pixels)
        evaluate_clt(teacher, clt, data, classifier, args.batch_size, max_images=1, progress=False)  # warm-up
        began = time.perf_counter()
        evaluate_clt(teacher, clt, data, classifier, args.batch_size, progress=False)
        seconds = time.perf_counter() - began
        rows.append({"sparsifier": sparsifier, "seconds": round(seconds, 2),
                     "images_per_s": round(args.images / seconds, 3)})
        print(f"{sparsifier:>10} {seconds:8.1f} {args.images / seconds:9.2f}", flush=True)
    print(json.dumps({"shape": args.shape, "expansion": args.expansion, "k": args.k, "images": args.images,
                      "batch_size": args.batch_size, "device": str(device), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
