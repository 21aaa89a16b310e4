"""Hugging Face Spaces: only model passes run inside the functions decorated with spaces.GPU, with a short duration;
the rest of an analysis (upload, retrieval, thumbnails, rendering) runs outside; the app takes the host and port
a Space sets."""

import importlib
import sys
import threading
import types

import pytest
from conftest import free_port
from gradio_client import Client, handle_file

import clt_explorer.app.ui as ui_module
from clt_explorer.retrieval.index import RetrievalIndex
from clt_explorer.retrieval.thumbnails import ThumbnailStore


@pytest.fixture
def ui_on_zerogpu(monkeypatch):
    """The UI module imported with a stand-in for the spaces package that records each decorated call."""
    record = {"durations": [], "calls": [], "inside": threading.local(), "outside_work": [], "inside_work": []}

    def gpu(duration):
        def decorate(fn):
            record["durations"].append(duration)

            def on_device(*args, **kwargs):
                record["calls"].append(fn.__name__)
                record["inside"].active = True
                try:
                    return fn(*args, **kwargs)
                finally:
                    record["inside"].active = False
            return on_device
        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    for cls, method in ((RetrievalIndex, "search"), (ThumbnailStore, "jpeg")):
        original = getattr(cls, method)

        def watched(self, *args, _original=original, _name=f"{cls.__name__}.{method}", **kwargs):
            inside = getattr(record["inside"], "active", False)
            record["inside_work" if inside else "outside_work"].append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, method, watched)
    yield importlib.reload(ui_module), record
    monkeypatch.delitem(sys.modules, "spaces")
    importlib.reload(ui_module)


def test_only_model_passes_run_inside_the_gpu_functions(ui_on_zerogpu, explorer):
    ui, record = ui_on_zerogpu
    assert record["durations"] == [ui.GPU_SECONDS] * 7 and ui.GPU_SECONDS <= 10
    demo = ui.build_ui(explorer)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        path = handle_file(str(explorer.examples()[1]))
        outputs = client.predict(path, "relu_topk", "all", 1, 3, 3, "cls", [0, 1, 2, 3], api_name="/analyze")
        client.predict(path, "relu_topk", "cls", 2, [0, 3], api_name="/predict")
        client.predict(path, "relu_topk", "cls", 2, api_name="/keep_top_terms")
        client.predict(path, "relu_topk", "cls", 0, [0, 1, 2, 3], 10, 3, api_name="/features")
        client.predict(path, "relu_topk", "1:0", "cls", 0, [0, 1, 2, 3], 1.0, api_name="/feature_card")
        client.predict(path, "relu_topk", "1:0", "cls", 0, [0, 1, 2, 3], 0.0, api_name="/intervene")
        client.predict(path, "relu_topk", "cls", 0, [0, 1, 2, 3], [], 0.8, 0.98, api_name="/graph")
    finally:
        demo.close()
    assert outputs[1]["label"]
    assert record["calls"] == ["model_pass", "replaced_predictions", "source_ranking", "ranked_features",
                               "opened_card", "edited_predictions", "edited_predictions",  # a card comes with its edit
                               "built_graph"]
    assert record["inside_work"] == []  # retrieval and thumbnails (also the feature cards') ran outside the GPU fns
    assert "RetrievalIndex.search" in record["outside_work"] and "ThumbnailStore.jpeg" in record["outside_work"]


def test_the_split_analysis_is_the_whole_analysis(explorer):
    from PIL import Image

    image = Image.open(explorer.examples()[2]).convert("RGB")
    model = explorer.model_pass(image, "abs_topk", "patches", 1, [0, 2, 3])
    assert all(t.device.type == "cpu" for t in (model.ys, model.yhat, *(c.values for c in model.codes)))
    split = explorer.assemble(model, 2, 4).to_dict()
    whole = explorer.analyze(image, "abs_topk", "patches", 1, 2, 4, [0, 2, 3]).to_dict()
    split.pop("seconds"), whole.pop("seconds")
    assert split == whole


def test_the_app_listens_where_a_space_says(monkeypatch):
    sys.path.insert(0, str(ui_module.__file__).rsplit("/clt_explorer/", 1)[0])
    import app

    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    args = app.parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 7861)
    monkeypatch.setenv("CLT_EXPLORER_HOST", "127.0.0.2")
    assert app.parse_args([]).host == "127.0.0.2"
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    monkeypatch.delenv("CLT_EXPLORER_HOST")
    assert app.parse_args([]).host == "127.0.0.1"
