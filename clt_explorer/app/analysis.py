"""One image -> everything the app shows, as plain data.

    image -> teacher forward with hooks (x_l, y_l for all l) -> CLT codes z_l
      (a) contributions C_{s->l} of this image (CLS and patch tokens), beside the dataset's
      (b) descriptors -> per-layer indexes -> the top-K training images of every layer i <= l
      (c) teacher forward with the CLT replacing blocks s..L-1 for a token set (the final layer keeping all
          its source terms, or a chosen subset) -> zero-shot top-5, beside the unmodified teacher's, with
          flip and KL; and this image's ranking of source layers by C_{s->L-1}
      (d) per-layer reconstruction quality of this image

The app, its API, the benchmarks and the tests all call :meth:`Explorer.analyze`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from ..assets.bundle import Bundle
from ..evaluation.layer_terms import keep_sources, source_order
from ..evaluation.metrics import kl_divergence, reconstruction_quality
from ..model.clt import CrossLayerTranscoder, normalize_contributions
from ..model.sparsifiers import SparseCodes
from ..model.teacher import Capture, PassBelow
from ..model.tokens import CLS, TOKEN_SETS, token_index
from ..retrieval.features import FeatureStore
from ..retrieval.index import RetrievalIndex, descriptors

BF16_ABOVE_BYTES = 2**30  # CLTs larger than this run in bfloat16 on a CPU by default
# the model passes of the latest images kept (a few MB each): one image's analysis, feature ranking, cards and
# interventions share its teacher's pass and unedited replaced pass
PASSES_KEPT = 4


@dataclass
class Prediction:
    classname: str
    probability: float


@dataclass
class Neighbour:
    thumbnail_id: int
    classname: str
    similarity: float


@dataclass
class Predictions:
    """Zero-shot top-5 of the teacher and of the CLT replacement of blocks start..L-1 for a token set."""

    teacher: list[Prediction]
    surrogate: list[Prediction]
    flip: bool
    kl: float


@dataclass
class LayerQuality:
    """How well the CLT reconstructs this image's MLP outputs at one layer (all tokens)."""

    layer: int
    r2: float
    cosine: float
    l0: float


@dataclass
class SourceScore:
    """A source layer s and its contribution C_{s->L-1} to this image's final layer."""

    layer: int
    score: float


@dataclass
class ModelPass:
    """The part of an analysis that needs the models, every tensor on the CPU: this image's codes in the teacher's
    pass, its MLP outputs and their reconstruction, its contributions C(s->l), and the predictions."""

    clt: str
    tokens: str
    start: int
    kept: list[int]
    codes: list[SparseCodes]
    ys: torch.Tensor
    yhat: torch.Tensor
    contributions: dict[str, list[list[float]]]
    predictions: Predictions
    seconds: float


@dataclass
class ReplacedPass:
    """One image's pass with the CLT replacing MLPs: zero-shot logits [1, C], the final residual at the CLS token
    [1, d], the (edited) codes of the replaced tokens per layer and, where the teacher's x_l were given, their codes
    per replaced layer (all tokens, unedited) and their terms where the pass replaced every token."""

    logits: torch.Tensor
    final_cls: torch.Tensor
    codes: list[SparseCodes]
    teacher_codes: dict[int, SparseCodes]
    teacher_terms: dict[int, torch.Tensor]


@dataclass
class Analysis:
    clt: str
    tokens: str
    start: int
    target: int
    top_k: int
    kept_sources: list[int]
    predictions: Predictions
    source_ranking: list[SourceScore]
    contributions: dict[str, list[list[float]]]
    dataset_contributions: dict[str, list[list[float]]] | None
    retrievals: dict[str, list[list[Neighbour]]]
    reconstruction: list[LayerQuality]
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def ranking_of(contributions: list[list[float]]) -> list[SourceScore]:
    """Source layers by their C_{s->L-1} (the last row of a contribution matrix), strongest first."""
    last = torch.tensor(contributions[-1])
    return [SourceScore(int(s), float(last[s])) for s in source_order(last, "image")]


def keep_top(ranking: list[SourceScore], m: int) -> list[int]:
    """The m strongest sources of a ranking, in layer order."""
    return sorted(s.layer for s in ranking[:max(0, m)])


def remove_top(ranking: list[SourceScore]) -> list[int]:
    """Every source but the strongest one, in layer order."""
    return sorted(s.layer for s in ranking[1:])


def top_predictions(logits: torch.Tensor, classnames: list[str], k: int = 5) -> list[Prediction]:
    """The k most probable classes of one image's logits [C]."""
    probabilities = logits.double().softmax(-1)
    values, indices = probabilities.topk(min(k, len(classnames)))
    return [Prediction(classnames[i], float(p)) for p, i in zip(values.tolist(), indices.tolist())]


def compare(reference: torch.Tensor, changed: torch.Tensor, classnames: list[str]) -> Predictions:
    """Top-5 of one image's reference and changed logits [1, C], whether the top-1 changed, KL(reference || changed)."""
    return Predictions(top_predictions(reference[0], classnames), top_predictions(changed[0], classnames),
                       bool(reference.argmax() != changed.argmax()), float(kl_divergence(reference, changed)[0]))


class Explorer:
    """A bundle opened for analysis: teacher, zero-shot classifier, and (loaded on first use) the CLTs,
    their retrieval indexes and the thumbnails. Safe to share between the threads of a web server."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu", clt_dtype: torch.dtype | None = None):
        self.bundle, self.device, self.clt_dtype = bundle, torch.device(device), clt_dtype
        self.teacher = bundle.load_teacher(self.device)
        self.classifier = bundle.load_classifier(self.teacher)
        self.teacher.drop_text_tower()  # the classifier is all an analysis needs of it
        self.thumbnails = bundle.load_thumbnails()
        self._clts: dict[str, CrossLayerTranscoder] = {}
        self._indexes: dict[str, RetrievalIndex] = {}
        self._feature_stores: dict[str, FeatureStore] = {}
        self._dataset_contributions: dict[str, dict | None] = {}
        self._passes: OrderedDict[tuple, tuple[Capture, PassBelow, list[SparseCodes], ReplacedPass]] = OrderedDict()
        self._lock = threading.Lock()
        self._manifest_mtime = bundle.manifest_path.stat().st_mtime_ns if bundle.manifest_path.is_file() else None
        if not bundle.clt_names:
            raise ValueError(f"bundle {bundle.name!r} holds no CLT")

    @property
    def version(self) -> int | None:
        """Changes whenever the bundle's manifest changes on disk (see :meth:`refresh`)."""
        return self._manifest_mtime

    def refresh(self) -> bool:
        """Re-read the bundle's manifest when it changed on disk (a build adding CLTs or results); returns whether
        it did. The teacher, the thumbnails and what was loaded stay."""
        mtime = self.bundle.manifest_path.stat().st_mtime_ns
        if mtime == self._manifest_mtime:
            return False
        self.bundle, self._manifest_mtime = Bundle.load(self.bundle.root), mtime
        return True

    @property
    def n_layers(self) -> int:
        return self.teacher.n_layers

    @property
    def clt_names(self) -> list[str]:
        return self.bundle.clt_names

    def examples(self) -> list[Path]:
        """The bundle's example images."""
        return self.bundle.examples()

    def clt(self, name: str) -> CrossLayerTranscoder:
        """CLT ``name``, loaded once (bfloat16 on a CPU when it is larger than 1 GiB, unless told otherwise)."""
        with self._lock:
            if name not in self._clts:
                dtype = self.clt_dtype
                if dtype is None and self.device.type == "cpu":
                    large = self.bundle.clt_weights_path(name).stat().st_size > BF16_ABOVE_BYTES
                    dtype = torch.bfloat16 if large else None
                self._clts[name] = self.bundle.load_clt(name, self.teacher, self.device, dtype)
            return self._clts[name]

    def index(self, name: str) -> RetrievalIndex | None:
        """The retrieval indexes of CLT ``name`` (None while the bundle has none)."""
        return self._per_corpus(self._indexes, name, self.bundle.load_index)

    def feature_store(self, name: str) -> FeatureStore | None:
        """The feature statistics of CLT ``name`` (None while the bundle has none)."""
        return self._per_corpus(self._feature_stores, name, self.bundle.load_feature_store)

    def _per_corpus(self, cache: dict, name: str, load: Callable[[str, int], object | None]):
        """CLT ``name``'s asset over the indexed corpus, ``load(name, n_images)`` once it exists (not cached while
        it does not: it may be built meanwhile)."""
        with self._lock:
            if name not in cache and self.thumbnails is not None:
                asset = load(name, len(self.thumbnails))
                if asset is not None:
                    cache[name] = asset
            return cache.get(name)

    def dataset_contributions(self, name: str) -> dict[str, list[list[float]]] | None:
        """Dataset-level C_{s->l} of CLT ``name`` from its evaluation (None while it has none; read once)."""
        with self._lock:
            if name not in self._dataset_contributions:
                results = self.bundle.evaluation(name)
                if results is None:
                    return None
                self._dataset_contributions[name] = results["contributions"]
            return self._dataset_contributions[name]

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """One image preprocessed for the teacher, on the explorer's device: [1, 3, H, W]."""
        return self.teacher.preprocess_images([image]).to(self.device)

    def kept_or_all(self, kept_sources: Sequence[int] | None) -> list[int]:
        """The sources the final layer keeps (all by default), checked."""
        kept = list(range(self.n_layers)) if kept_sources is None else sorted({int(s) for s in kept_sources})
        if any(not 0 <= s < self.n_layers for s in kept):
            raise ValueError(f"source layers must be in [0, {self.n_layers - 1}], got {kept}")
        return kept

    def check(self, clt: str, tokens: str, start: int, target: int | None = None, top_k: int = 1) -> int:
        """Raise ``ValueError`` for a CLT, token set, start or target layer, or top-K this bundle does not have;
        the target layer (L-1 by default)."""
        if clt not in self.clt_names:
            raise ValueError(f"unknown CLT {clt!r}; this bundle has {self.clt_names}")
        if tokens not in TOKEN_SETS:
            raise ValueError(f"token set must be one of {TOKEN_SETS}, got {tokens!r}")
        target = self.n_layers - 1 if target is None else target
        for name, value in (("start", start), ("target", target)):
            if not 0 <= value < self.n_layers:
                raise ValueError(f"{name} layer must be in [0, {self.n_layers - 1}], got {value}")
        if not 1 <= top_k <= 50:
            raise ValueError(f"top-K must be in [1, 50], got {top_k}")
        return target

    @torch.no_grad()
    def predict(self, image: Image.Image, clt: str, tokens: str = CLS, start: int = 0,
                kept_sources: Sequence[int] | None = None) -> Predictions:
        """Zero-shot top-5 of the teacher and of CLT ``clt`` replacing blocks start..L-1 for ``tokens``, the final
        layer keeping only the source terms ``kept_sources`` (all by default)."""
        self.check(clt, tokens, start)
        capture, below = self.teacher_pass(self.pixels(image), clt, start)
        replaced = self.replaced_pass(below, clt, tokens, start, self.kept_or_all(kept_sources))
        return compare(self.classifier.logits(capture.embeddings), replaced.logits, self.classifier.classnames)

    @torch.no_grad()
    def source_ranking(self, image: Image.Image, clt: str, tokens: str = CLS) -> list[SourceScore]:
        """This image's source layers by C_{s->L-1} over ``tokens`` (its codes in the teacher's pass)."""
        self.check(clt, tokens, 0)
        model = self.clt(clt)
        codes = model.encode_sparse(self.teacher.capture(self.pixels(image)).xs)
        return ranking_of(model.contributions([c.take_tokens(token_index(tokens)) for c in codes]).tolist())

    def term_weights(self, kept: list[int]) -> torch.Tensor | None:
        """The term mask of a final layer keeping the source terms ``kept`` (None when it keeps them all)."""
        mask = torch.zeros(self.n_layers, dtype=torch.bool)
        mask[kept] = True
        return None if mask.all() else keep_sources(self.n_layers, mask).to(self.device)

    @torch.no_grad()
    def replaced_pass(self, pixels: torch.Tensor | PassBelow, clt: str, tokens: str, start: int, kept: list[int],
                      feature_scales: dict[tuple[int, int], float] | None = None,
                      teacher_xs: torch.Tensor | None = None, decode_teacher: bool = False) -> ReplacedPass:
        """The pass with CLT ``clt`` replacing blocks start..L-1 for ``tokens``, the final layer keeping the source
        terms ``kept``, the codes scaled by ``feature_scales`` {(layer, feature): scale}. Given the teacher's pass up
        to block ``start``'s MLP instead of the pixels, it runs from block ``start + 1`` on (the same result,
        sooner). The teacher's x_l ``teacher_xs`` [L, 1, T, d] are encoded in the same products (their codes nearly
        free), and with ``decode_teacher`` decoded in the same gathers where every token is replaced."""
        surrogate = self.clt(clt).surrogate(term_weights=self.term_weights(kept), feature_scales=feature_scales,
                                            teacher_xs=teacher_xs, decode_teacher=decode_teacher)
        if isinstance(pixels, PassBelow):
            embeddings, final_cls = self.teacher.encode_resumed(surrogate, pixels, tokens)
        else:
            with self.teacher.replace_mlps(surrogate, start, tokens):
                embeddings, final_cls = self.teacher.encode_with_final(pixels)
        return ReplacedPass(self.classifier.logits(embeddings), final_cls, surrogate.codes, surrogate.teacher_codes,
                            surrogate.teacher_terms)

    @torch.no_grad()
    def teacher_pass(self, pixels: torch.Tensor, clt: str, start: int) -> tuple[Capture, PassBelow]:
        """The teacher's pass, and what a replacement with CLT ``clt`` starting at block ``start`` takes from it
        (:meth:`replaced_pass` then runs from block ``start + 1`` on)."""
        capture = self.teacher.capture(pixels, residuals_at=[start])
        model = self.clt(clt)
        codes = [model.encode_layer(layer, capture.xs[layer]) for layer in range(start + 1)]
        terms = list(model.source_terms(codes))
        return capture, capture.below(start, codes, terms)

    @torch.no_grad()
    def both_passes(self, pixels: torch.Tensor, clt: str, tokens: str, start: int, kept: list[int],
                    decode_teacher: bool = False) -> tuple[Capture, PassBelow, list[SparseCodes], ReplacedPass]:
        """The teacher's pass and the replaced pass (:meth:`replaced_pass`) resumed from it after block ``start``, with
        the codes of the teacher's pass at every layer: those above ``start`` are encoded in the replaced pass's own
        products (and with ``decode_teacher`` decoded in its gathers, where every token is replaced). The passes of
        the last ``PASSES_KEPT`` (image, CLT, tokens, start, kept) are kept and shared: their tensors must not be
        changed in place. They are kept without the teacher's terms decoded in the replaced pass, which only the model
        pass that asked for them sums (11 MB a pass at ViT-B/32 size)."""
        key = (hashlib.blake2b(pixels.cpu().numpy().tobytes(), digest_size=16).digest(), clt, tokens, start,
               tuple(kept))
        with self._lock:
            if key in self._passes:
                self._passes.move_to_end(key)
                return self._passes[key]
        capture, below = self.teacher_pass(pixels, clt, start)
        replaced = self.replaced_pass(below, clt, tokens, start, kept, teacher_xs=capture.xs,
                                      decode_teacher=decode_teacher)
        codes = below.codes + [replaced.teacher_codes[layer] for layer in range(start + 1, self.n_layers)]
        with self._lock:
            self._passes[key] = capture, below, codes, dataclasses.replace(replaced, teacher_terms={})
            while len(self._passes) > PASSES_KEPT:
                self._passes.popitem(last=False)
        return capture, below, codes, replaced

    @torch.no_grad()
    def model_pass(self, image: Image.Image, clt: str, tokens: str = CLS, start: int = 0,
                   kept_sources: Sequence[int] | None = None) -> ModelPass:
        """The model's part of an analysis: the teacher's pass with hooks, the codes, the reconstruction, the
        contributions and the replaced pass (what runs inside ``@spaces.GPU`` on a Space). The replaced pass resumes
        after block ``start`` from the teacher's pass and encodes the teacher's x_l above it in its own products; the
        codes are decoded once."""
        began = time.perf_counter()
        self.check(clt, tokens, start)
        kept = self.kept_or_all(kept_sources)
        model = self.clt(clt)
        capture, below, codes, replaced = self.both_passes(self.pixels(image), clt, tokens, start, kept,
                                                           decode_teacher=True)
        terms = below.terms + [replaced.teacher_terms[layer] if layer in replaced.teacher_terms else
                               model.decode_source(layer, codes[layer]) for layer in range(start + 1, self.n_layers)]
        yhat = model.sum_terms(terms).float()
        contributions = {group: normalize_contributions(model.term_norms(terms, token_index(group))).tolist()
                         for group in TOKEN_SETS}
        predictions = compare(self.classifier.logits(capture.embeddings), replaced.logits, self.classifier.classnames)
        return ModelPass(clt, tokens, start, kept, [c.cpu() for c in codes], capture.ys.float().cpu(), yhat.cpu(),
                         contributions, predictions, time.perf_counter() - began)

    def assemble(self, model: ModelPass, target: int | None = None, top_k: int = 3) -> Analysis:
        """The rest of an analysis, without the model: retrieval up to layer ``target``, per-layer quality, the
        image's ranking of source layers."""
        began = time.perf_counter()
        target = self.check(model.clt, model.tokens, model.start, target, top_k)
        return Analysis(model.clt, model.tokens, model.start, target, top_k, model.kept, model.predictions,
                        ranking_of(model.contributions[model.tokens]), model.contributions,
                        self.dataset_contributions(model.clt), self._retrieve(model.clt, model.codes, target, top_k),
                        _quality(model.ys, model.yhat, model.codes), model.seconds + time.perf_counter() - began)

    def analyze(self, image: Image.Image, clt: str, tokens: str = CLS, start: int = 0,
                target: int | None = None, top_k: int = 3, kept_sources: Sequence[int] | None = None) -> Analysis:
        """Everything the app shows for one image, with CLT ``clt`` (a name of the bundle)."""
        self.check(clt, tokens, start, target, top_k)
        return self.assemble(self.model_pass(image, clt, tokens, start, kept_sources), target, top_k)

    def _retrieve(self, clt: str, codes, target: int, top_k: int) -> dict[str, list[list[Neighbour]]]:
        index = self.index(clt)
        if index is None:
            return {}
        found = index.search(descriptors(codes), top_k, range(target + 1))
        names = self.classifier.classnames
        return {tokens: [[Neighbour(n.image_id, names[self.thumbnails.labels[n.image_id]], n.score)
                          for n in per_layer[layer][0]] for layer in range(target + 1)]
                for tokens, per_layer in found.items()}


def _quality(ys: torch.Tensor, yhat: torch.Tensor, codes) -> list[LayerQuality]:
    """Per layer, over this image's tokens: R^2, mean cosine and mean L0."""
    r = {name: values.tolist() for name, values in
         reconstruction_quality(ys.flatten(1, -2), yhat.flatten(1, -2)).items()}
    return [LayerQuality(layer, r["r2"][layer], r["cosine"][layer], float(codes[layer].l0().float().mean()))
            for layer in range(ys.shape[0])]
