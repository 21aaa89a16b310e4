import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BUNDLE_SETTINGS, TINY_BUNDLE_TRAIN

from clt_explorer.assets.bundle import Bundle
from clt_explorer.assets.hub import model_card, push_bundle
from clt_explorer.assets.pipeline import build_bundles, preset_jobs
from clt_explorer.retrieval.index import RetrievalIndex
from clt_explorer.retrieval.thumbnails import ThumbnailStore

ROOT = Path(__file__).parent.parent
WORKER = Path(__file__).with_name("pipeline_worker.py")


def small_build_args(tiny_bundle, out, extra=()):
    teacher = tiny_bundle.root / "teacher"
    return ["--backbones", f"local-dir:{teacher}", "--sparsifiers", "relu_topk", "--max-steps", "40",
            "--checkpoint-every", "20", "--eval-images", "100", "--retrieval-images", "300", "--batch-size", "100",
            "--no-progress", "--out", str(out), *extra]


def run(args, kill_at=None, torchrun=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("KILL_AT", None)
    if kill_at:
        env["KILL_AT"] = kill_at
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if torchrun else [
        sys.executable]
    return subprocess.run([*launcher, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=600)


def test_demo_bundle_is_complete_and_a_rerun_skips_every_step(tiny_bundle):
    assert tiny_bundle.clt_names == ["relu_topk", "abs_topk", "jumprelu"]
    store = ThumbnailStore(tiny_bundle.thumbnails_dir)
    assert len(store) == 1500
    for name in tiny_bundle.clt_names:
        clt = tiny_bundle.load_clt(name, tiny_bundle.load_teacher())
        RetrievalIndex.load(tiny_bundle.retrieval_dir(name), clt.config.n_layers, clt.config.n_features, 1500)
        assert name in tiny_bundle.manifest["evaluation"]
        terms = tiny_bundle.layer_terms(name)
        assert terms["start"] == 3 and set(terms["tokens"]) == {"cls", "patches", "all"}
    examples = [p.name for p in tiny_bundle.examples()]
    assert len(examples) == 8 and len({name.split("_", 1)[1] for name in examples}) == 8  # 8 classes
    jobs = preset_jobs("demo", train_overrides=TINY_BUNDLE_TRAIN, **TINY_BUNDLE_SETTINGS)
    out = tiny_bundle.root.parent / ".." / tiny_bundle.root.parent.name  # the same folder, through ".."
    reports = build_bundles(jobs, out, torch.device("cpu"), progress=False)
    assert {r.status for r in reports} == {"skipped"}, [r for r in reports if r.status != "skipped"]


def test_a_rerun_with_another_retrieval_budget_rebuilds_only_the_indexes(tiny_bundle, tmp_path):
    shutil.copytree(tiny_bundle.root, tmp_path / tiny_bundle.root.name)
    jobs = preset_jobs("demo", train_overrides=TINY_BUNDLE_TRAIN, **TINY_BUNDLE_SETTINGS, retrieval_budget=0.05)
    reports = build_bundles(jobs, tmp_path, torch.device("cpu"), progress=False)
    built = {r.step for r in reports if r.status != "skipped"}
    assert built == {f"retrieval {name}" for name in tiny_bundle.clt_names}, reports
    assert all(r.status == "built" for r in reports if r.step in built), reports
    bundle = Bundle.load(tmp_path / tiny_bundle.root.name)
    for name in bundle.clt_names:
        assert bundle.load_index(name, 1500).settings["budget"] == 0.05
    reports = build_bundles(jobs, tmp_path, torch.device("cpu"), progress=False)
    assert {r.status for r in reports} == {"skipped"}, [r for r in reports if r.status != "skipped"]


@pytest.mark.slow
def test_a_run_killed_during_training_resumes_from_its_last_checkpoint(tiny_bundle, tmp_path):
    killed = run(small_build_args(tiny_bundle, tmp_path), kill_at="step:27")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = tmp_path / "synthetic-teacher" / "clts" / "relu_topk"
    assert json.loads((folder / "checkpoints" / "latest.json").read_text())["step"] == 20
    resumed = run(small_build_args(tiny_bundle, tmp_path))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step 20" in resumed.stdout
    assert json.loads((folder / "training.json").read_text())["steps"] == 40
    steps = [json.loads(line)["step"] for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # every logged step once, none lost
    again = run(small_build_args(tiny_bundle, tmp_path))
    assert "0 built" in again.stdout and "0 failed" in again.stdout


@pytest.mark.slow
def test_two_processes_under_torchrun_build_the_same_bundle(tiny_bundle, tmp_path):
    single = run(small_build_args(tiny_bundle, tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    double = run(small_build_args(tiny_bundle, tmp_path / "two"), torchrun=True)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (Bundle.load(tmp_path / n / "synthetic-teacher") for n in ("one", "two"))
    assert json.loads((two.clt_dir("relu_topk") / "training.json").read_text())["world_size"] == 2
    a, b = one.manifest["evaluation"]["relu_topk"], two.manifest["evaluation"]["relu_topk"]
    assert a["baseline_accuracy"] == b["baseline_accuracy"]
    assert abs(a["mean_r2"] - b["mean_r2"]) < 0.03, (a, b)
    for tokens in ("cls", "patches", "all"):
        assert abs(a["accuracy_full_cascade"][tokens] - b["accuracy_full_cascade"][tokens]) < 5.0, (a, b)


def test_push_to_hub_uploads_the_folder_with_a_model_card(tiny_bundle, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
            calls.append(("upload", repo_id, folder_path))
            return "https://huggingface.co/me/demo/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_bundle(tiny_bundle, "me/demo")
    assert url.endswith("abc") and calls == [("create", "me/demo"), ("upload", "me/demo", str(tiny_bundle.root))]
    card = (tiny_bundle.root / "README.md").read_text()
    assert card == model_card(tiny_bundle)
    assert "local-dir:teacher" in card and "synthetic" in card and "relu_topk" in card and "mean R²" in card
    with pytest.raises(ValueError, match="invalid Hub repo id"):
        push_bundle(tiny_bundle, "../escape")


def test_a_pushed_bundle_opens_from_the_hub_cache_offline(tiny_bundle, tmp_path, monkeypatch):
    """hf://owner/repo resolves through huggingface_hub's cache (HF_HUB_OFFLINE: no network here)."""
    from huggingface_hub import constants

    from clt_explorer.assets.bundle import open_bundle

    revision = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--me--clt-demo"
    shutil.copytree(tiny_bundle.root, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    bundle = open_bundle("hf://me/clt-demo", cache_dir=str(tmp_path / "hub"))
    assert bundle.name == tiny_bundle.name and bundle.clt_names == tiny_bundle.clt_names
    teacher = bundle.load_teacher()
    assert bundle.load_clt("relu_topk", teacher).config.teacher == teacher.identity
    pinned = open_bundle("hf://me/clt-demo", revision=revision, cache_dir=str(tmp_path / "hub"))
    assert pinned.root == bundle.root


@pytest.mark.parametrize("offline", [True, False])
def test_offline_a_hub_download_asks_for_the_cache_only(offline, monkeypatch):
    """Offline, the cache is asked for directly (``local_files_only``): huggingface_hub 1.33, for a pinned commit,
    would otherwise list its files on the Hub and fail where its cache has no listing of that commit."""
    import huggingface_hub
    from huggingface_hub import constants

    from clt_explorer.storage import download_snapshot

    asked = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: asked.append(kwargs) or "/x")
    assert download_snapshot("me/clt-demo", "89abcdef0123456789abcdef0123456789abcdef") == Path("/x")
    assert asked[0]["local_files_only"] is offline and asked[0]["revision"].startswith("89abcdef")


def test_help_documents_presets_and_overrides():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_all.py"), "--help"], capture_output=True,
                          text=True, check=True)
    for word in ("--preset", "demo", "quick", "paper", "--push-to-hub", "--epochs", "torchrun"):
        assert word in done.stdout
