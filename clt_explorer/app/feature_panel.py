"""The Features tab: an image's top features per layer, and the card of one feature with its intervention slider.

Like the other panels, it creates its components and turns results of :mod:`.features` into {component: value};
the callbacks live in :class:`..ui.App`.
"""

from __future__ import annotations

import gradio as gr
from PIL import Image

from ..evaluation.figures import class_effect_figure, reach_figure
from .analysis import Explorer
from .features import (
    DEFAULT_MAX_CLS_RATE,
    DIRECT,
    PER_LAYER,
    RANKINGS,
    TOTAL,
    FeatureCard,
    FeatureRow,
    ImageFeatures,
    Intervention,
)
from .overlays import heat_overlay, tile

SCALE_RANGE = (-5.0, 20.0)


def _rate(value: float | None) -> str:
    return "rate unknown" if value is None else f"CLS of {100 * value:.1f}% of images"


SCORE_NAMES = {DIRECT: "attribution", TOTAL: "total effect"}


def _caption(row: FeatureRow, ranking: str) -> str:
    return (f"{row.layer}:{row.feature} · z {row.activation:.2f} · {SCORE_NAMES[ranking]} {row.attribution:+.3f} · "
            f"{_rate(row.cls_rate)}")


def _vmax(values) -> float:
    return max((abs(v) for v in values), default=0.0) or 1.0


class FeaturesPanel:
    """Per layer a gallery of the image's top features (tiles of this image's overlay and the feature's top
    training images); below, the card of the feature opened by a click or by "layer:feature"."""

    def __init__(self, n_layers: int):
        gr.Markdown("### Features of this image\nPer layer, the features with the largest **attribution** to the "
                    "predicted class of the CLT replacement chosen on the Explore tab: activation at the CLS token × "
                    "direct effect on the class logit (linearised at this image), or by its **total effect** through "
                    "attention and the later layers too (the attribution graph's linearisation, as on the Graph tab). "
                    "Each tile shows this image with the feature's activation per patch (top left), then the "
                    "training images where it fires most. Click one to open its card.")
        with gr.Row():
            self.max_rate = gr.Slider(0, 100, value=100 * DEFAULT_MAX_CLS_RATE, step=0.5, elem_id="max_cls_rate",
                                      label="Hide features firing on the CLS token of more than this % of training "
                                            "images (100: hide none)")
            self.per_layer = gr.Slider(1, 10, value=PER_LAYER, step=1, label="Features per layer",
                                       elem_id="features_per_layer")
            self.ranking = gr.Radio(list(RANKINGS), value=DIRECT, label="Rank by the effect on the class logit",
                                    elem_id="features_ranking")
            self.rank = gr.Button("Rank this image's features", variant="primary", elem_id="rank_features")
        self.summary = gr.Markdown(label="Features summary", elem_id="features_summary")
        self.galleries = [gr.Gallery(label=f"layer {layer}", columns=PER_LAYER, fit_columns=False, height="auto",
                                     allow_preview=False, elem_id=f"features_{layer}") for layer in range(n_layers)]
        self.picks = gr.State([])  # per layer, the features shown, in gallery order
        gr.Markdown("### Feature card")
        with gr.Row():
            self.feature = gr.Textbox(label="Open a feature by layer:feature", placeholder="e.g. 3:417",
                                      elem_id="feature_id", scale=3)
            self.open = gr.Button("Open", elem_id="open_feature", scale=1)
        self.title = gr.Markdown(label="Feature card", elem_id="feature_card")
        with gr.Row():
            self.image = gr.Image(label="This image, the feature's activation per patch", type="pil",
                                  interactive=False, height=220, elem_id="feature_image")
            self.reach = gr.Plot(label="Reach across layers", elem_id="feature_reach")
            self.classes = gr.Plot(label="Classes it pushes towards and away from", elem_id="feature_classes")
        self.top = gr.Gallery(label="Top training images, the feature's activation per patch", columns=8,
                              fit_columns=False, height="auto", allow_preview=False, elem_id="feature_top")
        self.scale = gr.Slider(*SCALE_RANGE, value=1.0, step=0.5, elem_id="feature_scale",
                               label="Scale of this feature at its source layer, inside the CLT replacement "
                                     "(1: unchanged, 0: ablated, negative: reversed)")
        with gr.Row():
            self.replaced = gr.Label(num_top_classes=5, label="CLT replacement", elem_id="feature_replaced")
            self.edited = gr.Label(num_top_classes=5, label="With the feature scaled", elem_id="feature_edited")
        self.effect = gr.Markdown(label="Intervention", elem_id="intervention_summary")
        self.list_components = [*self.galleries, self.picks, self.summary]
        self.card_components = [self.title, self.image, self.reach, self.classes, self.top]
        self.intervention_components = [self.replaced, self.edited, self.effect]

    def render_features(self, result: ImageFeatures, image: Image.Image, explorer: Explorer) -> dict:
        out = {self.picks: [[(row.layer, row.feature) for row in rows] for rows in result.layers]}
        mode = explorer.teacher.resize_mode
        for gallery, rows in zip(self.galleries, result.layers):
            out[gallery] = [(tile([heat_overlay(image, row.patch_map, result.grid, _vmax(row.patch_map),
                                                 resize_mode=mode),
                                    *(explorer.thumbnails.image(i) for i in row.top_images)]),
                             _caption(row, result.ranking))
                            for row in rows]
        hidden = ("" if result.max_cls_rate is None else
                  f" {result.hidden} active features firing on the CLS token of more than "
                  f"{100 * result.max_cls_rate:g}% of training images are hidden.")
        score = "Attribution to" if result.ranking == DIRECT else "Total effect on"
        out[self.summary] = (f"{score} **{result.predicted}** (the top-1 of "
                             f"{result.clt} replacing the {result.tokens} tokens in blocks {result.start}→"
                             f"{len(result.layers) - 1}).{hidden} Took {1000 * result.seconds:.0f} ms.")
        return out

    def empty_features(self, message: str = "") -> dict:
        return {**{gallery: [] for gallery in self.galleries}, self.picks: [], self.summary: message}

    def render_card(self, card: FeatureCard, image: Image.Image | None, explorer: Explorer, start: int) -> dict:
        mode, vmax = explorer.teacher.resize_mode, _vmax(t.peak for t in card.top_images)
        stats = card.stats
        lines = [f"#### Feature {card.layer}:{card.feature} of {card.clt}"]
        if stats:
            lines.append(f"Fires on {100 * stats['token_rate']:.2f}% of tokens, {100 * stats['image_rate']:.1f}% of "
                         f"images, the CLS token of {100 * stats['cls_rate']:.1f}% of images; mean activation "
                         f"{stats['mean']:.3f} where active, largest |activation| {stats['max_abs']:.3f}.")
        else:
            lines.append("The bundle has no feature statistics for this CLT yet (its build step has not run).")
        if card.image_activation is not None:
            strongest = max(card.image_map, key=abs)
            patches = f"{strongest:.3f} at its strongest patch" if strongest else "inactive on every patch"
            lines.append(f"On this image: {card.image_activation:.3f} at the CLS token, {patches}.")
        overlay = None
        if image is not None and card.image_map is not None:
            overlay = heat_overlay(image, card.image_map, card.grid, max(vmax, _vmax(card.image_map)),
                                   size=220, resize_mode=mode)
        top = [(heat_overlay(explorer.thumbnails.image(t.thumbnail_id), t.patch_map, card.grid, vmax,
                             resize_mode=mode), f"{t.classname} · peak {t.peak:.2f}") for t in card.top_images]
        classes = (class_effect_figure([(c.classname, c.effect) for c in card.towards],
                                       [(c.classname, c.effect) for c in card.away], card.linearised_at)
                   if card.towards else None)
        return {self.title: "\n\n".join(lines), self.image: overlay, self.top: top,
                self.reach: reach_figure(card.reach, card.layer, start), self.classes: classes}

    def render_intervention(self, result: Intervention | None, feature: str, scale: float) -> dict:
        if result is None:
            return {self.replaced: None, self.edited: None,
                    self.effect: "Upload an image (or pick an example) to scale this feature and see the predictions."}
        flip = "**changed**" if result.flip else "unchanged"
        return {self.replaced: {p.classname: p.probability for p in result.replaced},
                self.edited: {p.classname: p.probability for p in result.edited},
                self.effect: f"Feature {feature} scaled ×{scale:g}: the logit of **{result.classname}** changes by "
                             f"{result.logit_change:+.4f}; top-1 against the teacher's {flip}, KL(teacher ‖ edited) = "
                             f"{result.kl:.4f} · {1000 * result.seconds:.0f} ms"}
