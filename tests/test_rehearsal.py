"""The paper rehearsal at a tiny shape: every stage of the paper preset runs and is measured, and the bundle it
builds opens in the app."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from clt_explorer.app.analysis import Explorer
from clt_explorer.assets.bundle import Bundle

SCRIPT = Path(__file__).parent.parent / "scripts" / "rehearse_paper.py"


@pytest.mark.slow
def test_the_rehearsal_measures_every_stage_and_builds_a_bundle_the_app_opens(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path), "--scale", "0.006", "--shape",
                           "tiny"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["train_images"], result["test_images"], result["epochs"]) == (300, 100, 1)
    printed = [json.loads(line[len("stage "):]) for line in done.stdout.splitlines() if line.startswith("stage {")]
    assert printed == [{key: value for key, value in row.items() if key != "projected_s"} for row in result["stages"]]
    assert result["teacher_config"]["layers"] == 4 and result["failed"] == []
    stages = {row["stage"]: row for row in result["stages"]}
    expected = ["inputs (teacher, images)", "teacher", "zero-shot classifier", "examples", "thumbnails", "report"]
    for name in ("relu_topk", "abs_topk", "jumprelu"):
        expected += [f"{step} {name}" for step in ("train", "retrieval", "features", "evaluate", "layer terms")]
    assert sorted(stages) == sorted(expected)
    assert all(row["status"] == "built" and row["seconds"] >= 0 and row["host_peak_gb"] > 0.1
               for row in stages.values())
    assert stages["train relu_topk"]["bytes_written"] > 1e6 and stages["retrieval jumprelu"]["bytes_written"] > 1e6
    for stage, ratio in (("train abs_topk", 50_000 * 10 / 300), ("retrieval abs_topk", 50_000 / 300),
                         ("evaluate relu_topk", 10_000 / 100), ("report", 1)):  # the true scale's share of the work
        assert stages[stage]["projected_s"] == pytest.approx(stages[stage]["seconds"] * ratio, abs=0.06)
    assert result["projected_total_s"] == pytest.approx(sum(row["projected_s"] for row in stages.values()), abs=1)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "data").rglob("*.png"))
    assert stages["inputs (teacher, images)"]["bytes_written"] > on_disk > 0
    assert len(list((tmp_path / "data" / "test").iterdir())) == 100  # every class in both splits

    bundle = Bundle.load(result["bundle"])
    assert sorted(bundle.clt_names) == ["abs_topk", "jumprelu", "relu_topk"]
    assert bundle.clt_config("relu_topk").n_features == 16 * 64 and bundle.clt_config("relu_topk").k == 128
    explorer = Explorer(bundle)
    image = Image.open(explorer.examples()[0])
    analysis = explorer.analyze(image, "jumprelu", "all", 1)
    assert len(analysis.retrievals["cls"]) == explorer.n_layers and analysis.predictions.teacher
    assert bundle.report_path.is_file()

    again = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path), "--scale", "0.006", "--shape",
                            "tiny"], capture_output=True, text=True, timeout=900)
    rerun = json.loads(again.stdout.strip().splitlines()[-1])["stages"]
    assert {row["status"] for row in rerun[1:]} == {"skipped"}  # a rerun skips what is built: nothing to project
    assert all(row["projected_s"] == round(row["seconds"], 1) for row in rerun[1:])


@pytest.mark.slow
def test_the_rehearsal_under_torchrun_trains_on_two_processes(tmp_path):
    """Rank 1 starts after rank 0 has copied the teacher: it must still join the copy's barrier (it hung before)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT),
                           "--work", str(tmp_path), "--scale", "0.006", "--shape", "tiny"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failed"] == [] and {row["status"] for row in result["stages"]} == {"built"}
    bundle = Bundle.load(result["bundle"])
    for name in ("relu_topk", "abs_topk", "jumprelu"):
        assert json.loads((bundle.clt_dir(name) / "training.json").read_text())["world_size"] == 2
