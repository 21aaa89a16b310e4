"""The first start: the build's status file, one build at a time, and an app that follows a bundle as it grows."""

import json
import re
import shutil

import pytest

from clt_explorer import progress
from clt_explorer.app.bundle_source import GrowingBundle
from clt_explorer.app.ui import App, UploadLimits, build_ui, progress_markdown
from clt_explorer.assets.build_status import StatusWriter, build_unfinished, finished_bundles, read_status
from clt_explorer.assets.bundle import Bundle, build_lock_file, build_status_file
from clt_explorer.assets.default_bundle import BuildRunning, build_default, default_root
from clt_explorer.assets.pipeline import BundleJob, StepReport
from clt_explorer.storage import exclusive_lock


def test_the_status_file_follows_a_build_and_marks_it_unfinished(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    (root / "bundle.json").write_text("{}")
    status = StatusWriter(build_status_file(root))
    assert build_unfinished(root) and finished_bundles(tmp_path) == []
    status.started("train relu_topk")
    listener = status.progress
    progress.listen(listener)
    try:
        for _ in progress.tqdm(range(50), desc="training CLT (relu_topk)", mininterval=0):
            pass
        status._written = 0  # the next bar update is written at once
        status.progress("training CLT (relu_topk)", 50, 50)
    finally:
        progress._listeners.remove(listener)
    written = read_status(build_status_file(root))
    assert written["running"] == "train relu_topk" and written["bar"]["done"] == 50
    status.finished(StepReport("demo", "train relu_topk", "built", 12.5, "50 steps"))
    status.finished(StepReport("demo", "retrieval relu_topk", "failed", 1.0, "OSError: disk full"))
    status.done()
    written = read_status(build_status_file(root))
    assert written["finished"] and written["failed"] == ["retrieval relu_topk"]
    assert build_unfinished(root)  # finished, but with a failure: a later start builds again
    text = progress_markdown(GrowingBundle(root, 4, [], "").progress(), ready=True)
    assert "✓ train relu_topk (12 s)" in text and "**retrieval relu_topk failed**: OSError: disk full" in text
    status.state["failed"].clear()
    status.done()
    assert not build_unfinished(root) and finished_bundles(tmp_path) == [root]


def test_a_second_build_of_the_default_bundle_is_refused_while_one_runs(tmp_path):
    with exclusive_lock(build_lock_file(default_root(tmp_path))) as locked:
        assert locked
        with pytest.raises(BuildRunning, match="another process is building"):
            build_default(tmp_path, show_progress=False)
        with exclusive_lock(build_lock_file(default_root(tmp_path))) as again:
            assert not again
    assert not Bundle.exists(default_root(tmp_path))  # nothing was built


def test_a_local_weights_file_names_the_bundle_after_the_architecture_and_the_file():
    job = BundleJob("folder", "ViT-B-32-quickgelu:/root/long/path/to/w.safetensors")
    assert job.name == "folder-vit-b-32-quickgelu-w"
    assert job.teacher_description == "ViT-B-32-quickgelu with the weights w.safetensors"
    assert BundleJob("cifar100", "ViT-B-32").teacher_description == "ViT-B/32 (OpenAI)"
    assert BundleJob("synthetic", "tiny-clip").teacher_description == "tiny CLIP trained on synthetic shapes"


@pytest.fixture
def growing(tiny_bundle, tmp_path):
    """A copy of the tiny bundle that holds only its first CLT, and the manifest with all of them."""
    root = tmp_path / tiny_bundle.root.name
    shutil.copytree(tiny_bundle.root, root)
    full = json.loads((root / "bundle.json").read_text())
    first = dict(list(full["clts"].items())[:1])
    (root / "bundle.json").write_text(json.dumps({**full, "clts": {}}))
    return root, full, first


def test_the_app_follows_a_bundle_as_its_clts_arrive(growing):
    root, full, first = growing
    source = GrowingBundle(root, 4, list(full["clts"]), "tiny CLIP trained on synthetic shapes · bundle x")
    app = App(source, UploadLimits())
    build_ui(source)  # attaches nothing to app; only to check the page builds before any CLT exists
    assert source.explorer() is None
    (root / "bundle.json").write_text(json.dumps({**full, "clts": first}))
    explorer = source.explorer()
    assert explorer is not None and explorer.clt_names == list(first)
    version = explorer.version
    (root / "bundle.json").write_text(json.dumps(full))
    assert source.explorer() is explorer and explorer.clt_names == list(full["clts"])
    assert explorer.version != version
    with pytest.raises(Exception, match="still being prepared"):
        App(GrowingBundle(root.parent / "none", 4, [], "x"), UploadLimits()).explorer
    assert app.explorer is explorer


def test_the_status_endpoint_fills_the_page_about_tab_and_examples(client, explorer):
    """/status (the page's load and timer) gives the CLTs, the example images and the About tab as figures."""
    from test_app import named

    out = named(client, "/status", client.predict(None, "relu_topk", api_name="/status"))
    examples = out["Examples from the test split: click one"]  # files the client downloaded, under their names
    assert [item["image"].rsplit("/", 1)[-1] for item in examples] == [p.name for p in explorer.examples()]
    about = out["About this bundle"]
    assert "tiny CLIP trained on synthetic shapes" in about
    assert len(re.findall(r"\| compact \| (0\.9[5-9]\d|1\.000) / (0\.9[5-9]\d|1\.000) \|", about)) == 3  # recall
    for label in ("Training curves", "Reconstruction per layer (all tokens)", "Accuracy under cascaded replacement"):
        assert json.loads(out[label]["plot"])["data"], label
    assert out["CLT"]["value"] == explorer.clt_names[0]
    assert [value for value, _ in out["CLT"]["choices"]] == explorer.clt_names
