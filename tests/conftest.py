"""Shared fixtures: small open_clip teachers built locally (no downloads)."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import tempfile
from pathlib import Path

import open_clip
import pytest
import torch
from gradio_client import Client

from clt_explorer import CLTConfig, CrossLayerTranscoder
from clt_explorer.app.analysis import Explorer
from clt_explorer.app.ui import CSS, THEME, UploadLimits, build_ui
from clt_explorer.model import onednn_products
from clt_explorer.model.teacher import LOCAL_DIR, Teacher
from clt_explorer.training.tiny_clip import PREPROCESS_CONFIG, TINY_CLIP_CONFIG, save_open_clip_folder

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]


@contextlib.contextmanager
def chromium(viewport: dict, **options):
    """Debian's chromium driven by Playwright with a fresh profile (the test is skipped without the browser, and
    fails instead when CLT_REQUIRE_BROWSER is set, as in CI)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CLT_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                           args=CHROMIUM_FLAGS, viewport=viewport, **options)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@contextlib.contextmanager
def page_with_example(app_url: str, explorer, index: int, viewport: dict):
    """A browser page on the app with example ``index`` clicked into the upload."""
    from playwright.sync_api import expect

    with chromium(viewport) as browser:
        page = browser.new_page()
        page.goto(app_url)
        page.locator("#examples img").nth(index).click()
        expect(page.locator("#upload")).to_contain_text(explorer.examples()[index].stem, timeout=30_000)
        yield page


@pytest.fixture
def inner_products(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the inputs that reach oneDNN's inner product (:mod:`clt_explorer.model.onednn_products`)."""
    calls = []
    real = onednn_products.INNER_PRODUCT

    def record(x, *args):
        calls.append(tuple(x.shape))
        return real(x, *args)
    monkeypatch.setattr(onednn_products, "INNER_PRODUCT", record)
    return calls


def make_local_teacher(folder, seed: int = 0, model_cfg: dict | None = None) -> Teacher:
    """A randomly initialised open_clip CLIP saved in open_clip's folder format and loaded back."""
    torch.manual_seed(seed)
    cfg = copy.deepcopy(model_cfg or TINY_CLIP_CONFIG)
    model = open_clip.CLIP(**cfg)
    save_open_clip_folder(model, cfg, PREPROCESS_CONFIG, folder)
    return Teacher.load(LOCAL_DIR + str(folder))


def random_clt(teacher: Teacher, expansion: int, sparsifier: str, k: int, seed: int) -> CrossLayerTranscoder:
    """An untrained CLT for ``teacher`` with a non-zero decoder bias (so that a skipped bias shows)."""
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(teacher.n_layers, teacher.d_model, expansion, sparsifier, k))
    with torch.no_grad():
        clt.b_dec.normal_(0, 0.1)
    return clt


def random_pixels(teacher, n=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, teacher.image_size[0], teacher.image_size[1], generator=generator)


class Recorder:
    """Wraps a surrogate and records what it saw and returned."""

    def __init__(self, inner):
        self.inner, self.inputs, self.outputs = inner, [], []

    def begin(self):
        self.inner.begin()
        self.inputs, self.outputs = [], []

    def __call__(self, layer, x, index, y):
        out = self.inner(layer, x, index, y)
        self.inputs.append(x[:, index].clone())
        self.outputs.append(out.clone())
        return out


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory) -> Teacher:
    return make_local_teacher(tmp_path_factory.mktemp("random_teacher"))


TINY_BUNDLE_SETTINGS = dict(tiny_clip_steps=200, eval_images=200, retrieval_images=1500, batch_size=100)
TINY_BUNDLE_TRAIN = dict(epochs=1, max_steps=60, checkpoint_every=20)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The demo pipeline at a smaller size: tiny CLIP (200 steps), three CLTs (60 steps each),
    evaluation on 200 test images, retrieval over 1500 training images (about two minutes)."""
    from clt_explorer.assets.bundle import Bundle
    from clt_explorer.assets.pipeline import build_bundles, preset_jobs

    out = tmp_path_factory.mktemp("bundles")
    jobs = preset_jobs("demo", train_overrides=TINY_BUNDLE_TRAIN, **TINY_BUNDLE_SETTINGS)
    reports = build_bundles(jobs, out, torch.device("cpu"), progress=False)
    failed = [r for r in reports if r.status == "failed"]
    assert not failed, failed
    return Bundle.load(out / jobs[0].name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def explorer(tiny_bundle):
    return Explorer(tiny_bundle)


@pytest.fixture(scope="session")
def app_url(explorer):
    """The app on the tiny bundle, with 2 MB and 4 million pixel upload limits."""
    demo = build_ui(explorer, UploadLimits(max_bytes=2 * 2**20, max_pixels=4_000_000))
    demo.queue(default_concurrency_limit=2, max_size=32)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            show_error=True, max_file_size=2 * 2**20, theme=THEME, css=CSS)
    yield url
    demo.close()


@pytest.fixture(scope="session")
def client(app_url):
    return Client(app_url, verbose=False)
