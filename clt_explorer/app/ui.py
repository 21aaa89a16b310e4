"""The Gradio app: layout and callbacks that render :class:`Explorer` results, nothing more.

The page is built from panels; each panel creates its components and turns results into a dict
{component: value}, so a callback returns the union of the panels it updates and nothing depends on
the position of an output. Every event has an ``api_name``, so the app is also a documented API
(``/analyze``, ``/refresh``, ``/predict``, ``/heatmaps``, ``/keep_top_terms``, ``/remove_top_term``,
``/keep_all_terms``; on the Features tab ``/features``, ``/feature_card``, ``/pick_feature_<layer>``,
``/intervene``; on the Graph tab ``/graph`` and ``/graph_node``). Analyses are CPU-bound: ``concurrency`` of them
run at once and up to ``queue_size`` wait in Gradio's queue; beyond that a request is refused with a clear message.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go
from PIL import Image

from ..evaluation.figures import cascade_figure, contribution_heatmap, reconstruction_figure, training_figure
from ..evaluation.tables import evaluation_summary_markdown
from ..model.graph import AttributionGraph
from ..model.tokens import ALL, CLS, PATCHES, TOKEN_GROUPS, TOKEN_SETS
from ..storage import atomic_path, write_bytes, write_json
from .analysis import Analysis, Explorer, ModelPass, Predictions, SourceScore, keep_top, remove_top
from .bundle_source import BuildProgress, GrowingBundle, OpenedBundle
from .feature_panel import FeaturesPanel
from .features import (
    DIRECT,
    FeatureCard,
    ImageFeatures,
    Intervention,
    feature_card,
    image_features,
    intervene,
    parse_feature,
)
from .graph import ImageGraph, attribution_of, pruned_graph
from .graph_panel import CLICK_JS, GraphPanel
from .graph_panel import CSS as GRAPH_CSS
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, open_upload

GPU_SECONDS = 10  # the longest a model pass may hold a ZeroGPU device (it takes well under a second)

try:  # on Hugging Face ZeroGPU Spaces, GPU work runs inside functions decorated with spaces.GPU
    import spaces

    def on_gpu(fn):
        """Run ``fn`` on a ZeroGPU device, asking for a short ``duration``: the queue favours short requests."""
        return spaces.GPU(duration=GPU_SECONDS)(fn)
except ImportError:  # anywhere else the decorator does nothing
    def on_gpu(fn):
        return fn


# Only the model passes run inside the GPU functions (they count against a visitor's daily ZeroGPU minutes);
# reading the upload, retrieval, thumbnails, heatmaps and rendering run outside them.

@on_gpu
def model_pass(explorer: Explorer, image: Image.Image, clt: str, tokens: str, start: int, kept: list[int]) -> ModelPass:
    return explorer.model_pass(image, clt, tokens, start, kept)


@on_gpu
def replaced_predictions(explorer: Explorer, image: Image.Image, clt: str, tokens: str, start: int,
                         kept: list[int]) -> Predictions:
    return explorer.predict(image, clt, tokens, start, kept)


@on_gpu
def source_ranking(explorer: Explorer, image: Image.Image, clt: str, tokens: str) -> list[SourceScore]:
    return explorer.source_ranking(image, clt, tokens)


@on_gpu
def ranked_features(explorer: Explorer, image: Image.Image, clt: str, tokens: str, start: int, kept: list[int],
                    per_layer: int, max_cls_rate: float | None, ranking: str) -> ImageFeatures:
    return image_features(explorer, image, clt, tokens, start, kept, per_layer, max_cls_rate, ranking)


@on_gpu
def built_graph(explorer: Explorer, image: Image.Image, clt: str, tokens: str, start: int, kept: list[int],
                classes: list[str] | None) -> AttributionGraph:
    return attribution_of(explorer, image, clt, tokens, start, kept, classes)


@on_gpu
def opened_card(explorer: Explorer, image: Image.Image | None, clt: str, layer: int, feature: int, tokens: str,
                start: int, kept: list[int]) -> FeatureCard:
    return feature_card(explorer, clt, layer, feature, image, tokens, start, kept)


@on_gpu
def edited_predictions(explorer: Explorer, image: Image.Image, clt: str, scales: dict[tuple[int, int], float],
                       tokens: str, start: int, kept: list[int]) -> Intervention:
    return intervene(explorer, image, clt, scales, tokens, start, kept)


THEME = gr.themes.Soft()
CSS = ".layer-row {align-items: stretch} .layer-label {min-width: 5em; font-weight: 600} " + GRAPH_CSS
DESCRIPTOR_LABELS = {CLS: "CLS code", PATCHES: "patch-mean code"}


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def about_markdown(explorer: Explorer) -> str:
    """What the bundle is: teacher, dataset, retrieval, CLT settings and evaluation summary."""
    bundle = explorer.bundle
    m = bundle.manifest
    dataset, settings = m["dataset"], m.get("settings", {})
    lines = [f"## Bundle `{bundle.name}`", "",
             f"- **Teacher**: {bundle.teacher_description} (`{m['teacher']['model']}`), {explorer.n_layers} blocks, "
             f"width {explorer.teacher.d_model}, {explorer.teacher.n_tokens} tokens",
             f"- **Dataset**: `{dataset['name']}`, {len(dataset['classnames'])} classes, "
             f"{len(dataset['templates'])} prompt templates",
             f"- **Retrieval**: {len(explorer.thumbnails) if explorer.thumbnails else 0} indexed training images; "
             f"recall@10 is the share of the exact cosine search's top 10 that the index returns, measured on "
             f"held-out images when the index was built (worst layer)", ""]
    lines += ["| CLT | sparsifier | features/layer | k | trained on | index | recall@10 CLS / patch mean |",
              "|---|---|---|---|---|---|---|"]
    for name in explorer.clt_names:
        c, index = bundle.clt_config(name), explorer.index(name)
        recall = index.settings.get("recall_at_10") if index else None
        measured = " / ".join(f"{min(recall[t]):.3f}" for t in TOKEN_GROUPS) if recall else "not measured"
        lines.append(f"| {name} | {c.sparsifier} | {c.n_features} | {c.k} | "
                     f"{settings.get('train', {}).get('epochs', '?')} epochs | {index.mode if index else 'none'} | "
                     f"{measured} |")
    if m.get("evaluation"):
        lines += ["", "### Evaluation", "", *evaluation_summary_markdown(m["evaluation"])]
    return "\n".join(lines)


def about_figures(explorer: Explorer) -> tuple[go.Figure | None, go.Figure | None, go.Figure | None]:
    """The bundle's training curves, reconstruction per layer and accuracy under cascaded replacement."""
    bundle = explorer.bundle
    logs = {name: bundle.training_log(name) for name in explorer.clt_names}
    results = {name: r for name in explorer.clt_names if (r := bundle.evaluation(name)) is not None}
    logs = {name: records for name, records in logs.items() if records}
    return (training_figure(logs) if logs else None, reconstruction_figure(results, ALL) if results else None,
            cascade_figure(results) if results else None)


def progress_markdown(progress: BuildProgress | None, ready: bool) -> str:
    """The banner of a first start: what the background build is doing and what is done."""
    if progress is None or (progress.finished and not progress.failed):
        return ""
    lines = ["**Preparing the offline demo bundle** (first start only: it is kept under `checkpoints/` for the next "
             "start). " + ("Analyses work now; the other CLTs, their indexes and their evaluation appear here when "
                          "they are ready." if ready else "Analyze is enabled as soon as the first CLT has its "
                                                          "retrieval index.")]
    if progress.running:
        bar = progress.bar
        detail = ""
        if bar and bar.get("total"):
            detail = f" — {bar['description']}: {int(bar['done'])} / {int(bar['total'])} " \
                     f"({100 * bar['done'] / bar['total']:.0f}%)"
        lines.append(f"Now: **{progress.running}**{detail}")
    done = [f"{'✗' if s['status'] == 'failed' else '✓'} {s['step']} ({s['seconds']:.0f} s)" for s in progress.steps]
    if done:
        lines.append("Done: " + " · ".join(done))
    failed = [s for s in progress.steps if s["status"] == "failed"]
    for step in failed:
        lines.append(f"**{step['step']} failed**: {step['detail']} (the log is `{progress.log}`)")
    if progress.exit_code not in (None, 0) and not failed:
        lines.append(f"**The build stopped** (exit code {progress.exit_code}); the log is `{progress.log}`.")
    return "\n\n".join(lines)


def _labels(predictions: list) -> dict[str, float]:
    return {p.classname: p.probability for p in predictions}


def _summary(p: Predictions, tokens: str, start: int, n_layers: int, kept: list[int],
             seconds: float | None = None) -> str:
    flip = "**changed**" if p.flip else "unchanged"
    terms = "" if len(kept) == n_layers else (f", the final layer keeping only the terms of source layers "
                                              f"{', '.join(map(str, kept)) or 'none'}")
    text = (f"CLT replaces the MLP outputs of the **{tokens}** tokens in blocks {start}→{n_layers - 1}{terms}: "
            f"top-1 {flip}, KL(teacher ‖ CLT) = {p.kl:.4f}")
    return text + (f" · analysis took {seconds * 1000:.0f} ms" if seconds is not None else "")


def _ranking_markdown(ranking: list[SourceScore], tokens: str) -> str:
    return (f"This image's source layers by C(s→L-1), {tokens} tokens: "
            + " > ".join(f"**{s.layer}** ({s.score:.2f})" for s in ranking))


def heatmap_figures(data: dict | None, tokens: str) -> tuple[go.Figure | None, go.Figure | None]:
    """This image's and the dataset's C(s→l) heatmaps for one token group, from an analysis as plain data."""
    if not data:
        return None, None
    mine = contribution_heatmap(data["contributions"][tokens], f"This image ({tokens})")
    dataset = data.get("dataset_contributions")
    theirs = contribution_heatmap(dataset[tokens], f"Dataset ({tokens})") if dataset else go.Figure()
    return mine, theirs


class PredictionsPanel:
    """The teacher's and the replaced model's top-5, and a sentence saying what was replaced."""

    def __init__(self):
        with gr.Row():
            self.teacher = gr.Label(num_top_classes=5, label="Teacher (unmodified)", elem_id="teacher")
            self.surrogate = gr.Label(num_top_classes=5, label="With the CLT replacing MLPs", elem_id="surrogate")
        self.summary = gr.Markdown(label="Summary", elem_id="summary")
        self.components = [self.teacher, self.surrogate, self.summary]

    def render(self, p: Predictions, tokens: str, start: int, n_layers: int, kept: list[int],
               seconds: float | None = None) -> dict:
        return {self.teacher: _labels(p.teacher), self.surrogate: _labels(p.surrogate),
                self.summary: _summary(p, tokens, start, n_layers, kept, seconds)}

    def empty(self) -> dict:
        return {self.teacher: None, self.surrogate: None, self.summary: ""}


class LayerTermsPanel:
    """Which source layers' terms the final layer keeps: all by default, the image's top-m by C, or all but the
    top-1; the predictions above follow."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        with gr.Accordion("Layer terms of the final representation", open=True):
            self.kept = gr.CheckboxGroup([(str(s), s) for s in range(n_layers)], value=list(range(n_layers)),
                                         label="Source layers whose terms the final layer keeps", elem_id="kept")
            with gr.Row():
                self.m = gr.Slider(1, n_layers, value=min(4, n_layers), step=1, label="m", elem_id="terms_m")
                self.keep_top = gr.Button("Keep the top-m by this image's C", elem_id="keep_top", size="sm")
                self.remove_top = gr.Button("Remove the top-1", elem_id="remove_top", size="sm")
                self.keep_all = gr.Button("Keep all", elem_id="keep_all", size="sm")
            self.ranking = gr.Markdown(label="Source ranking", elem_id="source_ranking")
        self.components = [self.kept, self.ranking]

    def render_ranking(self, ranking: list[SourceScore], tokens: str) -> dict:
        """The ranking alone (after an analysis, which reads the kept sources without changing them)."""
        return {self.ranking: _ranking_markdown(ranking, tokens)}

    def render(self, kept: list[int], ranking: list[SourceScore], tokens: str) -> dict:
        return {self.kept: kept, **self.render_ranking(ranking, tokens)}

    def empty(self) -> dict:
        return {self.ranking: ""}


class HeatmapPanel:
    """C(s→l) of this image beside the dataset's, for the CLS or the patch tokens."""

    def __init__(self):
        self.tokens = gr.Radio(list(TOKEN_GROUPS), value=CLS, label="Contribution heatmap of")
        with gr.Row():
            self.image = gr.Plot(label="C(s→l), this image", elem_id="image_heatmap")
            self.dataset = gr.Plot(label="C(s→l), dataset", elem_id="dataset_heatmap")
        self.components = [self.image, self.dataset]

    def render(self, data: dict | None, tokens: str) -> dict:
        mine, theirs = heatmap_figures(data, tokens)
        return {self.image: mine, self.dataset: theirs}

    def empty(self) -> dict:
        return self.render(None, CLS)


class QualityPanel:
    """Per-layer reconstruction of this image's MLP outputs."""

    def __init__(self):
        self.table = gr.Dataframe(headers=["layer", "R²", "cosine", "L0"], label="Reconstruction of this image per "
                                  "layer (all tokens)", interactive=False, elem_id="quality")
        self.components = [self.table]

    def render(self, analysis: Analysis) -> dict:
        return {self.table: [[q.layer, round(q.r2, 4), round(q.cosine, 4), round(q.l0, 1)]
                             for q in analysis.reconstruction]}

    def empty(self) -> dict:
        return {self.table: None}


class RetrievalPanel:
    """For every layer l <= target, the training images whose CLS and patch-mean codes are closest."""

    def __init__(self, n_layers: int, thumbnail_file):
        self.thumbnail_file = thumbnail_file
        gr.Markdown("### Layer-wise retrieval: training images whose sparse codes are closest at each layer")
        self.rows, self.galleries = [], {}
        for layer in range(n_layers):
            with gr.Row(visible=layer == 0, elem_classes=["layer-row"]) as row:
                gr.Markdown(f"Layer {layer}", elem_classes=["layer-label"])
                for tokens in TOKEN_GROUPS:
                    self.galleries[layer, tokens] = gr.Gallery(
                        label=f"layer {layer}, {DESCRIPTOR_LABELS[tokens]}", columns=5, height=150,
                        elem_id=f"gallery_{layer}_{tokens}")
            self.rows.append(row)
        self.components = [*self.galleries.values(), *self.rows]

    def render(self, analysis: Analysis) -> dict:
        out = {row: gr.Row(visible=layer <= analysis.target) for layer, row in enumerate(self.rows)}
        for (layer, tokens), gallery in self.galleries.items():
            hits = analysis.retrievals.get(tokens, [])
            out[gallery] = ([(self.thumbnail_file(h.thumbnail_id), f"{h.classname} · {h.similarity:.2f}")
                             for h in hits[layer]] if layer <= analysis.target and layer < len(hits) else [])
        return out

    def empty(self) -> dict:
        return {**{gallery: [] for gallery in self.galleries.values()},
                **{row: gr.Row(visible=layer == 0) for layer, row in enumerate(self.rows)}}


class AboutPanel:
    """What the bundle is, and its evaluation as figures."""

    def __init__(self):
        self.text = gr.Markdown(label="About this bundle", elem_id="about")
        self.training = gr.Plot(label="Training curves", elem_id="about_training")
        self.reconstruction = gr.Plot(label="Reconstruction per layer (all tokens)", elem_id="about_reconstruction")
        self.cascade = gr.Plot(label="Accuracy under cascaded replacement", elem_id="about_cascade")
        self.report = gr.File(label="The bundle's report: one page that opens offline (report.html)",
                              elem_id="about_report")
        self.components = [self.text, self.training, self.reconstruction, self.cascade, self.report]

    def render(self, explorer: Explorer, staging: Path) -> dict:
        """The About tab; the report is served from a copy in ``staging`` (the app's own temporary folder: Gradio
        serves no file from elsewhere, e.g. the Hub cache), made once per version of the bundle, not per page."""
        report = explorer.bundle.report_path
        served = None
        if report.is_file():
            served = staging / f"report-{explorer.version}" / f"{explorer.bundle.name}-report.html"
            if not served.is_file():
                with atomic_path(served, durable=False) as tmp:
                    shutil.copyfile(report, tmp)
        return dict(zip(self.components, (about_markdown(explorer), *about_figures(explorer),
                                          str(served) if served else None)))


class App:
    """Callbacks bound to one bundle source; the panels are attached by :func:`build_ui`."""

    def __init__(self, source: OpenedBundle | GrowingBundle, limits: UploadLimits):
        self.source, self.limits = source, limits
        self.n_layers = source.n_layers
        self._served = Path(tempfile.mkdtemp(prefix="clt-explorer-files-"))  # files Gradio may serve
        weakref.finalize(self, shutil.rmtree, self._served, ignore_errors=True)  # removed with the app, or at exit

    @property
    def explorer(self) -> Explorer:
        """The explorer, or a message for the user while the default bundle has no CLT yet."""
        explorer = self.source.explorer()
        if explorer is None:
            raise gr.Error("The demo bundle is still being prepared; Analyze is enabled as soon as its first CLT is "
                           "ready (see the progress at the top of the page).")
        return explorer

    def poll(self, version, clt):
        """The page's view of the bundle source: the build's banner, and, when the bundle changed since this page
        last looked (``version``), its CLTs, examples and About tab."""
        explorer = self.source.explorer()
        progress = self.source.progress()
        out = {self.status: gr.Markdown(progress_markdown(progress, explorer is not None),
                                        visible=self.source.building or bool(progress and progress.failed)),
               self.timer: gr.Timer(active=self.source.building)}
        if explorer is None or explorer.version == version:
            return out
        names = explorer.clt_names
        return {**out, self.version: explorer.version, self.run: gr.Button(interactive=True),
                self.clt: gr.Dropdown(choices=names, value=clt if clt in names else names[0]),
                self.examples: [str(path) for path in explorer.examples()],
                self.graph_panel.classes: gr.Dropdown(choices=explorer.classifier.classnames),
                **self.about.render(explorer, self._served)}

    def pick_example(self, selected: gr.SelectData):
        """The clicked example image, as the upload."""
        return str(self.explorer.examples()[selected.index])

    def _image(self, path: str | None) -> Image.Image:
        try:
            return open_upload(path, self.limits.max_bytes, self.limits.max_pixels)
        except ImageError as error:
            raise gr.Error(str(error)) from error

    def thumbnail_file(self, thumbnail_id: int) -> str:
        """A thumbnail as a JPEG file (written once, served as is: no re-encoding per request; not fsynced: the
        folder lives as long as the process)."""
        path = self._served / f"{thumbnail_id}.jpg"
        if not path.is_file():
            write_bytes(path, self.explorer.thumbnails.jpeg(thumbnail_id), durable=False)
        return str(path)

    def render(self, image: Image.Image, analysis: Analysis, heatmap_tokens: str) -> dict:
        data = json.loads(json.dumps(analysis.to_dict()))
        return {self.preview: image, self.data: data,
                **self.predictions.render(analysis.predictions, analysis.tokens, analysis.start, self.n_layers,
                                          analysis.kept_sources, analysis.seconds),
                **self.terms.render_ranking(analysis.source_ranking, analysis.tokens),
                **self.heatmaps.render(data, heatmap_tokens), **self.quality.render(analysis),
                **self.retrieval.render(analysis)}

    def empty(self) -> dict:
        return {self.preview: None, self.data: None, **self.predictions.empty(), **self.terms.empty(),
                **self.heatmaps.empty(),
                **self.quality.empty(), **self.retrieval.empty()}

    @property
    def analysis_outputs(self) -> list:
        return [self.preview, *self.predictions.components, self.terms.ranking, *self.heatmaps.components,
                *self.quality.components, self.data, *self.retrieval.components]

    def analyze(self, path, clt, tokens, start, target, top_k, heatmap_tokens, kept,
                progress=gr.Progress(track_tqdm=True)):
        """Full analysis of an uploaded image (error when there is none)."""
        image = self._image(path)
        progress(0.1, desc="analysing")
        explorer = self.explorer
        try:
            model = model_pass(explorer, image, clt, tokens, int(start), [int(s) for s in kept])
            analysis = explorer.assemble(model, int(target), int(top_k))
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return self.render(image, analysis, heatmap_tokens)

    def refresh(self, path, clt, tokens, start, target, top_k, heatmap_tokens, kept):
        """Re-analyse after a control changed; clears the outputs when no image is loaded."""
        if not path:
            return self.empty()
        return self.analyze(path, clt, tokens, start, target, top_k, heatmap_tokens, kept)

    def predict(self, path, clt, tokens, start, kept):
        """Only the predictions, for a new replacement range, token set or set of kept source terms."""
        if not path:
            return self.predictions.empty()
        image = self._image(path)
        try:
            kept = sorted(int(s) for s in kept)
            p = replaced_predictions(self.explorer, image, clt, tokens, int(start), kept)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return self.predictions.render(p, tokens, int(start), self.n_layers, kept)

    def choose_terms(self, path, clt, tokens, m=None):
        """Kept sources from this image's ranking: its top-m (``m`` given), or all but its top-1."""
        if not path:
            raise gr.Error("No image: upload an image (or pick an example) first.")
        try:
            ranking = source_ranking(self.explorer, self._image(path), clt, tokens)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        kept = remove_top(ranking) if m is None else keep_top(ranking, int(m))
        return self.terms.render(kept, ranking, tokens)

    def keep_top_terms(self, path, clt, tokens, m):
        return self.choose_terms(path, clt, tokens, m)

    def remove_top_term(self, path, clt, tokens):
        return self.choose_terms(path, clt, tokens)

    def keep_all_terms(self):
        return {self.terms.kept: list(range(self.n_layers))}

    def rank_features(self, path, clt, tokens, start, kept, max_rate, per_layer, ranking=DIRECT):
        """This image's top features per layer (the Features tab)."""
        if not path:
            return self.features.empty_features("Upload an image (or pick an example) on the Explore tab first.")
        image = self._image(path)
        try:
            result = ranked_features(self.explorer, image, clt, tokens, int(start), [int(s) for s in kept],
                                     int(per_layer), None if max_rate >= 100 else max_rate / 100, ranking)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return self.features.render_features(result, image, self.explorer)

    def open_feature_card(self, path, clt, text, tokens, start, kept, scale):
        """The card of feature ``text`` ("layer:feature"), with the image's predictions at the slider's scale."""
        image = self._image(path) if path else None
        kept = [int(s) for s in kept]
        try:
            layer, feature = parse_feature(text)
            card = opened_card(self.explorer, image, clt, layer, feature, tokens, int(start), kept)
            edited = None if image is None else edited_predictions(self.explorer, image, clt,
                                                                   {(layer, feature): float(scale)}, tokens,
                                                                   int(start), kept)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return {**self.features.render_card(card, image, self.explorer, int(start)),
                **self.features.render_intervention(edited, f"{layer}:{feature}", scale)}

    def pick_feature(self, layer: int):
        """The callback of layer ``layer``'s gallery: the clicked feature's card."""
        def pick(path, clt, picks, tokens, start, kept, scale, selected: gr.SelectData):
            text = "{}:{}".format(*picks[layer][selected.index])
            return {self.features.feature: text, **self.open_feature_card(path, clt, text, tokens, start, kept, scale)}
        return pick

    def scale_feature(self, path, clt, text, tokens, start, kept, scale):
        """The predictions with the open feature scaled (the card's slider)."""
        if not path or not text:
            return self.features.render_intervention(None, text, scale)
        kept = [int(s) for s in kept]
        try:
            layer, feature = parse_feature(text)
            edited = edited_predictions(self.explorer, self._image(path), clt, {(layer, feature): float(scale)}, tokens,
                                        int(start), kept)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return self.features.render_intervention(edited, f"{layer}:{feature}", scale)

    def build_graph(self, path, clt, tokens, start, kept, classes, node_share, edge_share):
        """The Graph tab: this image's pruned attribution graph, and its JSON to download."""
        if not path:
            return self.graph_panel.empty("Upload an image (or pick an example) on the Explore tab first.")
        image = self._image(path)
        try:
            kept = [int(s) for s in kept]
            graph = pruned_graph(self.explorer, built_graph(self.explorer, image, clt, tokens, int(start), kept,
                                                            list(classes or []) or None),
                                 clt, kept, float(node_share), float(edge_share), Path(path).stem)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        json_file = self._served / f"graph-{uuid.uuid4().hex[:8]}" / f"{graph.export['metadata']['slug']}.json"
        write_json(json_file, graph.export)
        return self.graph_panel.render(graph, image, str(json_file), self.explorer.teacher.resize_mode)

    def open_graph_node(self, path, clicked, graph: ImageGraph | None, scale):
        """A clicked node (``clicked``: "index|time", written by the plot's click handler): a feature opens its card
        on the Features tab; every node is described and its patch, if it has one, lit on the image."""
        if graph is None or not clicked:
            return {}
        node = graph.nodes[int(clicked.split("|")[0])]
        panel = self.graph_panel
        out = {panel.node: f"**{node.label}** · influence {node.influence:.4f}"
                           + ("" if node.activation is None else f" · activation {node.activation:.4f}")}
        if path and node.token > 0:
            out[panel.image] = panel.patch_image(graph, self._image(path), self.explorer.teacher.resize_mode,
                                                 node.token)
        if node.kind == "feature":
            text = f"{node.layer}:{node.feature}"
            card = self.open_feature_card(path, graph.clt, text, graph.tokens, graph.start, graph.kept, scale)
            out.update({self.features.feature: text, **card, self.tabs: gr.Tabs(selected="features")})
        return out


def build_ui(source: Explorer | OpenedBundle | GrowingBundle, limits: UploadLimits = UploadLimits()) -> gr.Blocks:
    """The Blocks app for an explorer, or for a bundle source (the default bundle may still be building)."""
    return build_app(source, limits).demo


def build_app(source: Explorer | OpenedBundle | GrowingBundle, limits: UploadLimits = UploadLimits()) -> App:
    """The app's callbacks with their page (``app.demo``): the benchmarks render through it as the page does."""
    source = OpenedBundle(source) if isinstance(source, Explorer) else source
    app = App(source, limits)
    L = source.n_layers
    with gr.Blocks(title=f"CLT Explorer — {source.title}") as demo:
        gr.Markdown(f"# CLT Explorer\nCross-Layer Transcoders on **{source.title}** · {L} layers. Upload an image "
                    f"to see what each layer's sparse codes retrieve, which layers build its representation, and how "
                    f"the prediction changes when the CLT replaces the MLPs.")
        app.status = gr.Markdown(visible=source.building, elem_id="status")
        with gr.Tabs() as app.tabs:
            with gr.Tab("Explore", id="explore"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                        app.preview = gr.Image(label="Uploaded image", type="pil", interactive=False, height=220,
                                               elem_id="preview")
                        app.examples = gr.Gallery(label="Examples from the test split: click one", columns=4,
                                                  height=150, allow_preview=False, show_label=True,
                                                  elem_id="examples")
                        app.clt = gr.Dropdown(source.clt_names, value=source.clt_names[0], label="CLT",
                                              elem_id="clt")
                        tokens = gr.Radio(list(TOKEN_SETS), value=CLS, label="Tokens the CLT replaces",
                                          elem_id="tokens")
                        start = gr.Slider(0, L - 1, value=0, step=1, label="Replace blocks s → L-1: s",
                                          elem_id="start")
                        target = gr.Slider(0, L - 1, value=L - 1, step=1,
                                           label="Target layer l (retrieval rows 0..l)", elem_id="target")
                        top_k = gr.Slider(1, 10, value=3, step=1, label="Top-K retrieved images", elem_id="top_k")
                        app.run = gr.Button("Analyze", variant="primary", interactive=False, elem_id="analyze")
                    with gr.Column(scale=2):
                        app.predictions = PredictionsPanel()
                        app.terms = LayerTermsPanel(L)
                        app.heatmaps = HeatmapPanel()
                        app.quality = QualityPanel()
                app.retrieval = RetrievalPanel(L, app.thumbnail_file)
                with gr.Accordion("Analysis data (JSON)", open=False):
                    app.data = gr.JSON(label="Analysis data", elem_id="data")
            with gr.Tab("Features", id="features") as features_tab:
                app.features = FeaturesPanel(L)
            with gr.Tab("Graph", id="graph") as graph_tab:
                opened = source.explorer()
                app.graph_panel = GraphPanel(opened.classifier.classnames if opened is not None else [])
            with gr.Tab("About", id="about"):
                app.about = AboutPanel()
        app.version = gr.State(None)
        app.timer = gr.Timer(2.0, active=source.building)

        controls = [upload, app.clt, tokens, start, target, top_k, app.heatmaps.tokens, app.terms.kept]
        outputs = app.analysis_outputs
        app.run.click(app.analyze, controls, outputs, api_name="analyze")
        gr.on([upload.change, app.clt.change, target.change, top_k.change], app.refresh, controls, outputs,
              api_name="refresh", trigger_mode="always_last")
        gr.on([tokens.change, start.change, app.terms.kept.change], app.predict,
              [upload, app.clt, tokens, start, app.terms.kept], app.predictions.components, api_name="predict",
              trigger_mode="always_last")
        app.terms.keep_top.click(app.keep_top_terms, [upload, app.clt, tokens, app.terms.m], app.terms.components,
                                 api_name="keep_top_terms")
        app.terms.remove_top.click(app.remove_top_term, [upload, app.clt, tokens], app.terms.components,
                                   api_name="remove_top_term")
        app.terms.keep_all.click(app.keep_all_terms, None, [app.terms.kept], api_name="keep_all_terms")
        app.heatmaps.tokens.change(app.heatmaps.render, [app.data, app.heatmaps.tokens], app.heatmaps.components,
                                   api_name="heatmaps")
        app.examples.select(app.pick_example, None, [upload], api_name="pick_example")
        panel = app.features
        gr.on([features_tab.select, panel.rank.click, panel.max_rate.release, panel.per_layer.release,
               panel.ranking.change], app.rank_features,
              [upload, app.clt, tokens, start, app.terms.kept, panel.max_rate, panel.per_layer, panel.ranking],
              panel.list_components, api_name="features", trigger_mode="always_last")
        card_inputs = [upload, app.clt, panel.feature, tokens, start, app.terms.kept, panel.scale]
        card_outputs = panel.card_components + panel.intervention_components
        gr.on([panel.open.click, panel.feature.submit], app.open_feature_card, card_inputs, card_outputs,
              api_name="feature_card")
        for layer, gallery in enumerate(panel.galleries):
            gallery.select(app.pick_feature(layer), [upload, app.clt, panel.picks, tokens, start, app.terms.kept,
                                                     panel.scale], [panel.feature, *card_outputs],
                           api_name=f"pick_feature_{layer}")
        panel.scale.change(app.scale_feature, card_inputs, panel.intervention_components, api_name="intervene",
                           trigger_mode="always_last")
        graph = app.graph_panel
        gr.on([graph_tab.select, graph.build.click], app.build_graph,
              [upload, app.clt, tokens, start, app.terms.kept, graph.classes, graph.node_share, graph.edge_share],
              graph.components, api_name="graph", trigger_mode="always_last")
        graph.clicked.change(app.open_graph_node, [upload, graph.clicked, graph.graph, panel.scale],
                            [graph.node, graph.image, panel.feature, app.tabs, *card_outputs], api_name="graph_node")
        demo.load(None, js=CLICK_JS)
        poll_outputs = [app.status, app.timer, app.run, app.clt, app.examples, app.version, graph.classes,
                        *app.about.components]
        gr.on([demo.load, app.timer.tick], app.poll, [app.version, app.clt], poll_outputs, api_name="status")
    app.demo = demo
    gc.freeze()  # the page and the models live as long as the app: the collector's full scans of them took ~30 ms
    return app
