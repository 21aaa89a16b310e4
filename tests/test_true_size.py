"""The non-demo path, offline: an open_clip ViT-B/32 architecture with weights from a local safetensors file, a real
dataset adapter (an image folder), the ``quick`` preset through scripts/train_all.py, and the app's analysis of the
resulting bundle at the true width (12 layers, d = 768)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clt_explorer.app.analysis import Explorer
from clt_explorer.assets.bundle import Bundle
from clt_explorer.storage import save_tensors

ROOT = Path(__file__).parent.parent
CLASSES = ["red apple", "green pear", "blue car", "white dog", "black cat"]


def image_folder(root: Path, per_class: dict[str, int]) -> None:
    """root/<split>/<class>/<n>.png: each class a colour and a size of square, with noise."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name.replace(" ", "_")
            folder.mkdir(parents=True)
            for n in range(count):
                pixels = rng.integers(0, 60, (48, 48, 3)).astype(np.uint8)
                pixels[8 + c * 3:40 - c * 3, 8 + c * 3:40 - c * 3, c % 3] = 255
                Image.fromarray(pixels).save(folder / f"{n}.png")


@pytest.mark.slow
def test_quick_preset_on_a_local_vit_b_32_and_an_image_folder(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_tensors(weights, open_clip.create_model("ViT-B-32-quickgelu").state_dict())
    data = tmp_path / "data"
    image_folder(data, {"train": 4, "test": 2})
    out = tmp_path / "bundles"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_all.py"), "--preset", "quick", "--datasets", "folder",
         "--data-root", str(data), "--backbones", f"ViT-B-32-quickgelu:{weights}", "--sparsifiers", "relu_topk",
         "--expansion", "1", "--k", "16", "--max-steps", "3", "--batch-tokens", "256", "--chunk-images", "10",
         "--warmup-steps", "1", "--train-images", "20", "--eval-images", "4", "--retrieval-images", "20",
         "--batch-size", "10", "--thumbnail-size", "32", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 failed" in done.stdout
    bundle = Bundle.load(out / "folder-vit-b-32-quickgelu-w")  # named after the architecture and the file's stem
    assert bundle.teacher_description == "ViT-B-32-quickgelu with the weights w.safetensors"
    assert bundle.classnames == sorted(CLASSES, key=lambda n: n.replace(" ", "_"))
    config = bundle.clt_config("relu_topk")
    assert (config.n_layers, config.d_model, config.n_features) == (12, 768, 768)
    assert bundle.evaluation("relu_topk")["cascade"]["starts"] == list(range(12))
    assert bundle.layer_terms("relu_topk")["target"] == 11
    explorer = Explorer(bundle)
    image = Image.open(next((data / "test").rglob("*.png"))).convert("RGB")
    analysis = explorer.analyze(image, "relu_topk", "cls", 9, 11, 3)
    assert len(analysis.reconstruction) == 12 and np.array(analysis.contributions["cls"]).shape == (12, 12)
    assert len(analysis.retrievals["cls"]) == 12 and all(len(hits) == 3 for hits in analysis.retrievals["patches"])
    assert {p.classname for p in analysis.predictions.teacher} <= set(bundle.classnames)
