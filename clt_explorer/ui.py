"""The Gradio app: layout and callbacks that render :meth:`Explorer.analyze` results, nothing more.

Every event has an ``api_name``, so the app is also a documented API (``/analyze``, ``/refresh``,
``/predict``, ``/heatmaps``). Analyses are CPU-bound: ``concurrency`` of them run at once and up to
``queue_size`` wait in Gradio's queue; beyond that a request is refused with a clear message.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go
from PIL import Image

from .analysis import Analysis, Explorer, Predictions
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, open_upload
from .report import contribution_heatmap, evaluation_summary_markdown
from .storage import write_bytes
from .teacher import TOKEN_SETS

try:  # on Hugging Face ZeroGPU Spaces, GPU work runs inside functions decorated with spaces.GPU
    import spaces

    gpu = spaces.GPU
except ImportError:  # anywhere else the decorator does nothing
    def gpu(fn):
        return fn

THEME = gr.themes.Soft()
CSS = ".layer-row {align-items: stretch} .layer-label {min-width: 5em; font-weight: 600}"


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def about_markdown(explorer: Explorer) -> str:
    """What the bundle is: teacher, dataset, CLT settings and evaluation summary."""
    m = explorer.bundle.manifest
    teacher, dataset, settings = m["teacher"], m["dataset"], m.get("settings", {})
    lines = [f"## Bundle `{explorer.bundle.name}`", "",
             f"- **Teacher**: `{teacher['model']}`" + (f" (`{teacher['pretrained']}`)" if teacher.get("pretrained")
                                                      else "") + f", {explorer.n_layers} blocks, "
             f"width {explorer.teacher.d_model}, {explorer.teacher.n_tokens} tokens",
             f"- **Dataset**: `{dataset['name']}`, {len(dataset['classnames'])} classes, "
             f"{len(dataset['templates'])} prompt templates",
             f"- **Retrieval**: {len(explorer.thumbnails) if explorer.thumbnails else 0} indexed training images", ""]
    lines += ["| CLT | sparsifier | features/layer | k | teacher | trained on |", "|---|---|---|---|---|---|"]
    for name in explorer.clt_names:
        c = explorer.bundle.clt_config(name)
        lines.append(f"| {name} | {c.sparsifier} | {c.n_features} | {c.k} | `{c.teacher}` | "
                     f"{settings.get('train', {}).get('epochs', '?')} epochs |")
    if m.get("evaluation"):
        lines += ["", "### Evaluation", "", *evaluation_summary_markdown(m["evaluation"])]
    return "\n".join(lines)


def _labels(predictions: list) -> dict[str, float]:
    return {p.classname: p.probability for p in predictions}


def _summary(p: Predictions, tokens: str, start: int, n_layers: int, seconds: float | None = None) -> str:
    flip = "**changed**" if p.flip else "unchanged"
    text = (f"CLT replaces the MLP outputs of the **{tokens}** tokens in blocks {start}→{n_layers - 1}: "
            f"top-1 {flip}, KL(teacher ‖ CLT) = {p.kl:.4f}")
    return text + (f" · analysis took {seconds * 1000:.0f} ms" if seconds is not None else "")


def _heatmaps(data: dict | None, tokens: str):
    if not data:
        return None, None
    mine = contribution_heatmap(data["contributions"][tokens], f"This image ({tokens})")
    dataset = data.get("dataset_contributions")
    theirs = contribution_heatmap(dataset[tokens], f"Dataset ({tokens})") if dataset else go.Figure()
    return mine, theirs


class App:
    """Callbacks bound to one explorer."""

    def __init__(self, explorer: Explorer, limits: UploadLimits):
        self.explorer, self.limits = explorer, limits
        self.n_layers = explorer.n_layers
        self._thumbnail_dir = Path(tempfile.mkdtemp(prefix="clt-explorer-thumbnails-"))

    def _image(self, path: str | None) -> Image.Image:
        try:
            return open_upload(path, self.limits.max_bytes, self.limits.max_pixels)
        except ImageError as error:
            raise gr.Error(str(error)) from error

    def _thumbnail(self, thumbnail_id: int) -> str:
        """A thumbnail as a JPEG file (written once, served as is: no re-encoding per request)."""
        path = self._thumbnail_dir / f"{thumbnail_id}.jpg"
        if not path.is_file():
            write_bytes(path, self.explorer.thumbnails.jpeg(thumbnail_id))
        return str(path)

    def render(self, image: Image.Image, analysis: Analysis, heatmap_tokens: str) -> list:
        data = json.loads(json.dumps(analysis.to_dict()))
        galleries, rows = [], []
        for layer in range(self.n_layers):
            visible = layer <= analysis.target
            rows.append(gr.Row(visible=visible))
            for tokens in ("cls", "patches"):
                hits = analysis.retrievals.get(tokens, [])
                items = [(self._thumbnail(h.thumbnail_id), f"{h.classname} · {h.similarity:.2f}")
                         for h in hits[layer]] if visible and layer < len(hits) else []
                galleries.append(items)
        quality = [[q.layer, round(q.r2, 4), round(q.cosine, 4), round(q.l0, 1)] for q in analysis.reconstruction]
        p = analysis.predictions
        return [image, _labels(p.teacher), _labels(p.surrogate),
                _summary(p, analysis.tokens, analysis.start, self.n_layers, analysis.seconds),
                *_heatmaps(data, heatmap_tokens), quality, data, *galleries, *rows]

    def empty(self) -> list:
        return [None, None, None, "", None, None, None, None, *([[]] * (2 * self.n_layers)),
                *[gr.Row(visible=layer == 0) for layer in range(self.n_layers)]]

    @gpu
    def analyze(self, path, sparsifier, tokens, start, target, top_k, heatmap_tokens,
                progress=gr.Progress(track_tqdm=True)):
        """Full analysis of an uploaded image (error when there is none)."""
        image = self._image(path)
        progress(0.1, desc="analysing")
        try:
            analysis = self.explorer.analyze(image, sparsifier, tokens, int(start), int(target), int(top_k))
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return self.render(image, analysis, heatmap_tokens)

    def refresh(self, path, sparsifier, tokens, start, target, top_k, heatmap_tokens):
        """Re-analyse after a control changed; clears the outputs when no image is loaded."""
        if not path:
            return self.empty()
        return self.analyze(path, sparsifier, tokens, start, target, top_k, heatmap_tokens)

    @gpu
    def predict(self, path, sparsifier, tokens, start):
        """Only the predictions, for a new replacement range or token set."""
        if not path:
            return None, None, ""
        image = self._image(path)
        try:
            p = self.explorer.predict(image, sparsifier, tokens, int(start))
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return _labels(p.teacher), _labels(p.surrogate), _summary(p, tokens, int(start), self.n_layers)


def build_ui(explorer: Explorer, limits: UploadLimits = UploadLimits()) -> gr.Blocks:
    """The Blocks app for one explorer."""
    app = App(explorer, limits)
    L = explorer.n_layers
    with gr.Blocks(title=f"CLT Explorer — {explorer.bundle.name}") as demo:
        gr.Markdown(f"# CLT Explorer\nCross-Layer Transcoders on `{explorer.bundle.manifest['teacher']['model']}` "
                    f"· bundle `{explorer.bundle.name}` · {L} layers. Upload an image to see what each layer's sparse "
                    f"codes retrieve, which layers build its representation, and how the prediction changes when "
                    f"the CLT replaces the MLPs.")
        with gr.Tab("Explore"):
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                    preview = gr.Image(label="Uploaded image", type="pil", interactive=False, height=220,
                                       elem_id="preview")
                    examples = [[str(p)] for p in explorer.examples()]
                    if examples:
                        gr.Examples(examples, inputs=[upload], label="Examples from the test split")
                    sparsifier = gr.Dropdown(explorer.clt_names, value=explorer.clt_names[0], label="CLT",
                                             elem_id="sparsifier")
                    tokens = gr.Radio(list(TOKEN_SETS), value="cls", label="Tokens the CLT replaces", elem_id="tokens")
                    start = gr.Slider(0, L - 1, value=0, step=1, label="Replace blocks s → L-1: s", elem_id="start")
                    target = gr.Slider(0, L - 1, value=L - 1, step=1, label="Target layer l (retrieval rows 0..l)",
                                       elem_id="target")
                    top_k = gr.Slider(1, 10, value=3, step=1, label="Top-K retrieved images", elem_id="top_k")
                    run = gr.Button("Analyze", variant="primary", elem_id="analyze")
                with gr.Column(scale=2):
                    with gr.Row():
                        teacher_label = gr.Label(num_top_classes=5, label="Teacher (unmodified)", elem_id="teacher")
                        surrogate_label = gr.Label(num_top_classes=5, label="With the CLT replacing MLPs",
                                                   elem_id="surrogate")
                    summary = gr.Markdown(elem_id="summary")
                    heatmap_tokens = gr.Radio(["cls", "patches"], value="cls", label="Contribution heatmap of")
                    with gr.Row():
                        image_heatmap = gr.Plot(label="C(s→l), this image", elem_id="image_heatmap")
                        dataset_heatmap = gr.Plot(label="C(s→l), dataset", elem_id="dataset_heatmap")
                    quality = gr.Dataframe(headers=["layer", "R²", "cosine", "L0"], label="Reconstruction of this "
                                           "image per layer (all tokens)", interactive=False, elem_id="quality")
            gr.Markdown("### Layer-wise retrieval: training images whose sparse codes are closest at each layer")
            galleries, rows = [], []
            for layer in range(L):
                with gr.Row(visible=layer == 0, elem_classes=["layer-row"]) as row:
                    gr.Markdown(f"Layer {layer}", elem_classes=["layer-label"])
                    for tokens_, kind in (("cls", "CLS code"), ("patches", "patch-mean code")):
                        galleries.append(gr.Gallery(label=f"layer {layer}, {kind}", columns=5, height=150,
                                                    elem_id=f"gallery_{layer}_{tokens_}"))
                rows.append(row)
            with gr.Accordion("Analysis data (JSON)", open=False):
                data = gr.JSON(elem_id="data")
        with gr.Tab("About"):
            gr.Markdown(about_markdown(explorer))

        controls = [upload, sparsifier, tokens, start, target, top_k, heatmap_tokens]
        outputs = [preview, teacher_label, surrogate_label, summary, image_heatmap, dataset_heatmap, quality, data,
                   *galleries, *rows]
        run.click(app.analyze, controls, outputs, api_name="analyze")
        gr.on([upload.change, sparsifier.change, target.change, top_k.change], app.refresh, controls, outputs,
              api_name="refresh", trigger_mode="always_last")
        gr.on([tokens.change, start.change], app.predict, [upload, sparsifier, tokens, start],
              [teacher_label, surrogate_label, summary], api_name="predict", trigger_mode="always_last")
        heatmap_tokens.change(_heatmaps, [data, heatmap_tokens], [image_heatmap, dataset_heatmap], api_name="heatmaps")
    return demo
