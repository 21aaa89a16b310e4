"""The feature drill-down as plain data: one image's top features per layer, one feature's card, and
interventions that scale single features inside the cascade replacement.

Attribution of feature (s, f) to class c, for one image, in the model the user looks at (the CLT replacing blocks
start..L-1 for a token set that includes the CLS token, the final layer keeping the chosen source terms), ranked
``direct`` (the default) or ``total``. Direct:

    a(s, f) = z_s(CLS)[f] * grad_c . direction(s, f)

z_s(CLS) is the feature's code at the CLS token in that replaced pass, ``direction`` what one unit of it writes
into the residual stream by the final LayerNorm (the targets l >= max(s, start), through LayerScale and the term
mask), and grad_c the gradient of class c's logit with respect to the final residual at the CLS token in the same
pass (:mod:`..model.attribution`). It is the feature's direct effect, linearised at this image; what it does
through attention and the later layers is not counted. At start = L-1 with the CLS token replaced, ablating a
feature changes nothing but the last block's CLS output, so the attribution is exact up to the readout's
linearisation; ``scripts/feature_attribution.py`` measures how well it predicts ablations.

Total: the feature's total effect on c's logit in the linearised replacement model of the attribution graph
(:func:`..model.graph.feature_total_effects`: attention patterns and LayerNorm scales frozen at this image, every
path through attention and later features counted), summed over the replaced tokens where it is active, as an
ablation removes it from all of them. With only the last block replaced the two rankings are equal.

The class is the replaced model's top-1. The image's patch heat maps, like the corpus statistics of the feature
store, come from the unmodified teacher's pass. Features firing on the CLS token of more than ``max_cls_rate``
of the training images (always-on features, in every image's list) are hidden from the ranking by default.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
from PIL import Image

from ..model.attribution import reach, readout_gradient, residual_directions
from ..model.graph import feature_total_effects
from ..model.linearised import LinearisedReplacement
from ..model.surrogate import check_feature
from ..model.tokens import CLS, PATCHES, token_index
from .analysis import Explorer, Prediction, compare, top_predictions

DEFAULT_MAX_CLS_RATE = 0.10  # the demo's features fire on 6.25% of CLS tokens on average; 10% hides the busiest ~20%
PER_LAYER = 5
TILE_IMAGES = 3  # beside the image's own overlay: a 2 x 2 tile
CLASSES_SHOWN = 5
DIRECT, TOTAL = "direct", "total"
RANKINGS = (DIRECT, TOTAL)
_FEATURE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_feature(text: str) -> tuple[int, int]:
    """``"layer:feature"`` -> (layer, feature), or a ValueError that says the form expected."""
    match = _FEATURE.match(text or "")
    if not match:
        raise ValueError(f"open a feature as layer:feature, e.g. 3:417 (got {text!r})")
    return int(match[1]), int(match[2])


@dataclass
class FeatureRow:
    """One of an image's top features at one layer."""

    layer: int
    feature: int
    activation: float
    attribution: float
    cls_rate: float | None
    image_rate: float | None
    top_images: list[int]
    patch_map: list[float]


@dataclass
class ImageFeatures:
    """An image's top features of every layer by attribution to the replaced model's predicted class."""

    clt: str
    tokens: str
    start: int
    kept: list[int]
    predicted: str
    layers: list[list[FeatureRow]]
    ranking: str
    hidden: int
    max_cls_rate: float | None
    grid: tuple[int, int]
    seconds: float


@dataclass
class ClassEffect:
    classname: str
    effect: float


@dataclass
class TopImage:
    thumbnail_id: int
    classname: str
    peak: float
    patch_map: list[float]


@dataclass
class FeatureCard:
    """What one feature is: corpus statistics, top images with patch maps, reach across targets, the classes its
    direct effect pushes towards and away from, and (with an image) its activation and patch map there."""

    clt: str
    layer: int
    feature: int
    stats: dict[str, float] | None
    top_images: list[TopImage]
    reach: list[float]
    towards: list[ClassEffect]
    away: list[ClassEffect]
    linearised_at: str
    image_activation: float | None
    image_map: list[float] | None
    grid: tuple[int, int]
    seconds: float


@dataclass
class Intervention:
    """The teacher's, the replaced model's and the edited replaced model's top-5 for features scaled at their source
    layer; KL(teacher || edited), whether the edit moved the top-1 away from the teacher's, and how the replaced
    model's top-1 class's logit changed."""

    scales: dict[str, float]
    teacher: list[Prediction]
    replaced: list[Prediction]
    edited: list[Prediction]
    kl: float
    flip: bool
    classname: str
    logit_change: float
    seconds: float


def _patch_map(codes, feature: int) -> list[float]:
    """A feature's code on every patch token of one image (codes of one layer [1, T, ...], teacher's pass)."""
    return codes.take_tokens(token_index(PATCHES)).dense()[0, :, feature].float().tolist()


@torch.no_grad()
def image_features(explorer: Explorer, image: Image.Image, clt: str, tokens: str = CLS, start: int = 0,
                   kept_sources: list[int] | None = None, per_layer: int = PER_LAYER,
                   max_cls_rate: float | None = DEFAULT_MAX_CLS_RATE, ranking: str = DIRECT) -> ImageFeatures:
    """The ``per_layer`` features of every layer active at the CLS token with the largest ``ranking`` attribution
    (direct or total) to the replaced model's top-1 class (see the module's docstring), hiding features that fire on
    the CLS token of more than ``max_cls_rate`` of the training images (None: hide none)."""
    began = time.perf_counter()
    explorer.check(clt, tokens, start)
    if tokens == PATCHES:
        raise ValueError("feature attribution goes through the CLS token: choose the token set cls or all (with "
                         "only the patch tokens replaced, features reach the prediction through attention alone)")
    if not 1 <= per_layer <= 50:
        raise ValueError(f"features per layer must be in [1, 50], got {per_layer}")
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    kept = explorer.kept_or_all(kept_sources)
    model, teacher, store = explorer.clt(clt), explorer.teacher, explorer.feature_store(clt)
    pixels = explorer.pixels(image)
    _, _, teacher_codes, replaced = explorer.both_passes(pixels, clt, tokens, start, kept)
    predicted = int(replaced.logits[0].argmax())
    gradient = readout_gradient(teacher, explorer.classifier, replaced.final_cls[0])[predicted]
    weights = explorer.term_weights(kept)
    totals = None
    if ranking == TOTAL:
        totals = feature_total_effects(LinearisedReplacement(teacher, model, pixels, start, tokens, weights), gradient)
    layers, hidden = [], 0
    for layer, codes in enumerate(replaced.codes):
        z = codes.take_tokens(slice(0, 1)).dense()[0, 0].float()  # the CLS token's codes [F]
        active = z.nonzero()[:, 0]
        if store is not None and max_cls_rate is not None:
            shown = store.stat("cls_rate", layer)[active.cpu()] <= max_cls_rate
            hidden += int((~shown).sum())
            active = active[shown.to(active.device)]
        if totals is None:
            attribution = z[active] * (residual_directions(model, teacher, layer, active, start, weights) @ gradient)
        else:
            attribution = totals[layer][active]
        order = attribution.argsort(descending=True)[:per_layer]
        rows = []
        for i in order.tolist():
            f = int(active[i])
            top = store.top_images(layer, f).ids[:TILE_IMAGES] if store is not None else []
            rows.append(FeatureRow(layer, f, float(z[f]), float(attribution[i]),
                                   float(store.stat("cls_rate", layer)[f]) if store is not None else None,
                                   float(store.stat("image_rate", layer)[f]) if store is not None else None,
                                   top, _patch_map(teacher_codes[layer], f)))
        layers.append(rows)
    return ImageFeatures(clt, tokens, start, kept, explorer.classifier.classnames[predicted], layers, ranking, hidden,
                         max_cls_rate if store is not None else None, teacher.grid, time.perf_counter() - began)


@torch.no_grad()
def feature_card(explorer: Explorer, clt: str, layer: int, feature: int, image: Image.Image | None = None,
                 tokens: str = CLS, start: int = 0, kept_sources: list[int] | None = None) -> FeatureCard:
    """Feature ``layer:feature`` of CLT ``clt``. Its class effects are linearised at ``image``'s replaced pass, or
    without an image at the training images' mean final residual (from the feature store)."""
    began = time.perf_counter()
    explorer.check(clt, tokens, start)
    model, teacher, store = explorer.clt(clt), explorer.teacher, explorer.feature_store(clt)
    check_feature(layer, feature, model.config.n_layers, model.config.n_features)
    kept = explorer.kept_or_all(kept_sources)
    direction = residual_directions(model, teacher, layer, torch.tensor([feature]), start,
                                    explorer.term_weights(kept))[0]
    activation = image_map = None
    if image is not None:
        _, _, codes, replaced = explorer.both_passes(explorer.pixels(image), clt, tokens, start, kept)
        activation, image_map = float(codes[layer].dense()[0, 0, feature]), _patch_map(codes[layer], feature)
        point, linearised_at = replaced.final_cls[0], "this image"
    elif store is not None:
        point, linearised_at = store.final_cls_mean, "the training images' mean final residual"
    else:
        point, linearised_at = None, "nowhere: no image and no feature statistics yet"
    towards, away = [], []
    if point is not None:
        effect = readout_gradient(teacher, explorer.classifier, point) @ direction
        names = explorer.classifier.classnames
        order = effect.argsort(descending=True).tolist()
        shown = min(CLASSES_SHOWN, len(order) // 2)
        towards = [ClassEffect(names[c], float(effect[c])) for c in order[:shown]]
        away = [ClassEffect(names[c], float(effect[c])) for c in order[::-1][:shown]]
    stats, top = None, []
    if store is not None:
        stats = {name: float(values[layer, feature]) for name, values in store.stats.items()}
        found = store.top_images(layer, feature)
        labels, names = explorer.thumbnails.labels, explorer.classifier.classnames
        top = [TopImage(i, names[labels[i]], peak, patches.tolist())
               for i, peak, patches in zip(found.ids, found.peaks, found.maps)]
    return FeatureCard(clt, layer, feature, stats, top, reach(model, layer, feature).tolist(), towards, away,
                       linearised_at, activation, image_map, teacher.grid, time.perf_counter() - began)


@torch.no_grad()
def intervene(explorer: Explorer, image: Image.Image, clt: str, scales: dict[tuple[int, int], float],
              tokens: str = CLS, start: int = 0, kept_sources: list[int] | None = None) -> Intervention:
    """Scale features {(layer, feature): scale} at their source layer inside the cascade replacement (0 ablates,
    negative values flip, large ones amplify): the edited codes change every target l >= s and all downstream."""
    began = time.perf_counter()
    explorer.check(clt, tokens, start)
    kept = explorer.kept_or_all(kept_sources)
    capture, below, _, plain = explorer.both_passes(explorer.pixels(image), clt, tokens, start, kept)
    edited = explorer.replaced_pass(below, clt, tokens, start, kept, scales).logits  # resumed from the teacher's pass
    teacher_logits, replaced = explorer.classifier.logits(capture.embeddings), plain.logits
    names, top1 = explorer.classifier.classnames, int(replaced[0].argmax())
    against_teacher = compare(teacher_logits, edited, names)
    return Intervention({f"{s}:{f}": float(a) for (s, f), a in scales.items()}, against_teacher.teacher,
                        top_predictions(replaced[0], names), against_teacher.surrogate, against_teacher.kl,
                        against_teacher.flip, names[top1], float(edited[0, top1] - replaced[0, top1]),
                        time.perf_counter() - began)
