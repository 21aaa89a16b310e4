"""The CLT as the MLP replacement of a forward pass, and the one seam where its codes are edited.

At block l the surrogate encodes z_l from this pass's own x_l, applies the edit, adds the edited
codes' terms to every later target, and returns the reconstruction of y_l:

    z_l'       = z_l * scale_l                       (feature_scales: per (layer, feature), default 1)
    u_{l->l'}  = z_l' @ W_dec[l -> l']               for every target l' >= l
    yhat_l     = b_dec[l] + sum_{s <= l} W[l, s] u_{s->l}    (term_weights W, default all ones)

Scales of 1 and weights of 1 are exact identities (x * 1.0 == x), so an edit that changes nothing
gives bit for bit the unedited replacement. An edit at source s changes no target below s.

With ``error_term`` the surrogate returns y_l + (yhat_l - yhat_l without the edit), y_l being the
teacher's own MLP output on this pass's x_l (the "error term" of SAELens): without an edit that is
exactly the teacher, and an edit then acts on the teacher itself rather than on the reconstruction.

Given ``teacher_xs`` (the teacher's own x_l of the same images), the surrogate encodes them in the same product as
this pass's x_l, as extra tokens: for one image on a CPU the encode is bound by reading W_enc[l] (100 tokens take
~10% longer than 50), so an analysis gets the teacher's codes nearly free. Tokens are encoded independently, so
neither set's codes depend on the other's; up to the first replaced block's MLP both sets are the same, encoded once.
Where every token is replaced, the teacher's codes are decoded too (``teacher_terms``): where they are this pass's own,
as this pass's; above, with ``decode_teacher``, in the same gather as this pass's, token by token, so that the decoder
rows both sets use at a token are read from memory once (the decode is bound by reading W_dec: a true-size
analysis's decodes take ~45 instead of ~57 ms).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .sparsifiers import SparseCodes

if TYPE_CHECKING:
    from .clt import CrossLayerTranscoder


def check_term_weights(term_weights: torch.Tensor | None, n_layers: int) -> torch.Tensor | None:
    """Validate a term mask: [L, L] (row = target l, column = source s) or [B, L, L] (one per image)."""
    if term_weights is None:
        return None
    if term_weights.dim() not in (2, 3) or tuple(term_weights.shape[-2:]) != (n_layers, n_layers):
        raise ValueError(f"term_weights must have shape [{n_layers}, {n_layers}] or [B, {n_layers}, {n_layers}], "
                         f"got {tuple(term_weights.shape)}")
    if not torch.isfinite(term_weights).all():
        raise ValueError("term_weights must be finite")
    return term_weights.float()


def check_feature(layer: int, feature: int, n_layers: int, n_features: int) -> None:
    """Raise ``ValueError`` for a feature ``layer:feature`` outside ``n_layers`` x ``n_features``."""
    if not (0 <= layer < n_layers and 0 <= feature < n_features):
        raise ValueError(f"feature {layer}:{feature} does not exist: layers 0..{n_layers - 1}, "
                         f"features 0..{n_features - 1}")


def feature_scale_vectors(feature_scales: dict[tuple[int, int], float] | None, n_layers: int, n_features: int
                          ) -> list[torch.Tensor | None]:
    """Per layer, a [F] vector of code scales (None where the layer has no edit)."""
    vectors: list[torch.Tensor | None] = [None] * n_layers
    for (layer, feature), scale in (feature_scales or {}).items():
        check_feature(layer, feature, n_layers, n_features)
        if not math.isfinite(scale):
            raise ValueError(f"the scale of feature {layer}:{feature} must be finite, got {scale}")
        if vectors[layer] is None:
            vectors[layer] = torch.ones(n_features)
        vectors[layer][feature] = scale
    return vectors


class CLTSurrogate:
    """Called block by block, in order, on one forward pass (see :meth:`Teacher.replace_mlps`)."""

    def __init__(self, clt: CrossLayerTranscoder, sparse: bool | None = None, term_weights: torch.Tensor | None = None,
                 feature_scales: dict[tuple[int, int], float] | None = None, error_term: bool = False,
                 teacher_xs: torch.Tensor | None = None, decode_teacher: bool = False):
        c = clt.config
        self.clt, self.sparse, self.error_term, self.teacher_xs = clt, sparse, error_term, teacher_xs
        self.decode_teacher = decode_teacher
        self.reads_teacher_output = error_term  # else the teacher's MLP need not run on the replaced tokens
        self.term_weights = check_term_weights(term_weights, c.n_layers)
        self.scales = feature_scale_vectors(feature_scales, c.n_layers, c.n_features)
        self.edits = self.term_weights is not None or any(s is not None for s in self.scales)
        self.begin()

    def begin(self) -> None:
        """Forget the previous pass."""
        self.codes: list[SparseCodes] = []  # the (edited) codes of this pass, per layer
        self._edited: torch.Tensor | None = None  # sum of the edited terms per target [B, T', L, d]
        self._plain: torch.Tensor | None = None  # the same without the edit (error term only)
        self.teacher_codes: dict[int, SparseCodes] = {}  # the unedited codes of teacher_xs[l], per layer encoded
        self.teacher_terms: dict[int, torch.Tensor] = {}  # their terms, per layer where this pass replaced every token

    def resume(self, codes: list[SparseCodes], terms: list[torch.Tensor], index: slice | torch.Tensor,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """Take the teacher's own pass up to the MLP of block s = ``len(codes) - 1`` (:meth:`Teacher.encode_resumed`):
        the codes of blocks 0..s and their terms ([B, T, L - s, d], :meth:`CrossLayerTranscoder.decode_source`), all
        tokens, which a replacement starting at s leaves as they are (block s's MLP input is still the teacher's);
        ``index`` picks the replaced tokens. An edit there is applied as it would be in a whole pass. Returns the
        replacement of block s's MLP output given the teacher's ``y`` there, as a call at block s would."""
        self.begin()
        for layer, (layer_codes, part) in enumerate(zip(codes, terms)):
            layer_codes, part = layer_codes.take_tokens(index), part[:, index]
            scale = self.scales[layer]
            edited = layer_codes if scale is None else layer_codes.scaled(scale.to(part.device))
            self.codes.append(edited)
            self._edited = self._add_terms(self._edited, layer, edited, self.term_weights,
                                           part if scale is None else None)
            if self.error_term and self.edits:
                self._plain = self._add_terms(self._plain, layer, layer_codes, None, part)
        return self._output(len(codes) - 1, index, y)

    def __call__(self, layer: int, x: torch.Tensor, index: slice = slice(None),
                 y: torch.Tensor | None = None) -> torch.Tensor:
        """The replacement of block ``layer``'s MLP output for the tokens ``x[:, index]`` [B, T', d]."""
        if layer != len(self.codes):
            raise RuntimeError(f"CLT surrogate called for block {layer} after {len(self.codes)} blocks")
        codes = self._encode(layer, x, index)
        scale = self.scales[layer]
        edited = codes if scale is None else codes.scaled(scale.to(x.device))
        self.codes.append(edited)
        part, teacher = None, self.teacher_codes.get(layer)
        if edited is teacher:  # the teacher's own codes, every token, unedited: their terms too
            part = self.teacher_terms[layer] = self.clt.decode_source(layer, edited, self.sparse)
        elif teacher is not None and self.decode_teacher and index == slice(None):  # both sets' in one gather
            self.teacher_terms[layer], part = self.clt.decode_source_pair(layer, teacher, edited, self.sparse)
        self._edited = self._add_terms(self._edited, layer, edited, self.term_weights, part)
        if self.error_term and self.edits:
            self._plain = self._add_terms(self._plain, layer, codes, None, part if edited is codes else None)
        return self._output(layer, index, y)

    def _output(self, layer: int, index: slice | torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The replacement of block ``layer``'s MLP output for the tokens ``index``, from the terms summed so far."""
        if not self.error_term:
            return self._edited[..., layer, :] + self.clt.b_dec[layer].to(self._edited.dtype)
        if y is None:
            raise ValueError("the error term needs the teacher's MLP output y")
        if not self.edits:
            return y[:, index].clone()
        return y[:, index] + (self._edited[..., layer, :] - self._plain[..., layer, :]).to(y.dtype)

    def _encode(self, layer: int, x: torch.Tensor, index: slice | torch.Tensor) -> SparseCodes:
        """The codes of this pass's tokens ``x[:, index]`` [B, T', d] at ``layer``, and of the teacher's there, if
        given, in one product; where this pass's tokens are still the teacher's own (up to the first replaced block),
        the teacher's codes are theirs."""
        x = x[:, index]
        if self.teacher_xs is None:
            return self.clt.encode_layer(layer, x)
        teacher_x = self.teacher_xs[layer].to(x.dtype)
        if torch.equal(teacher_x[:, index], x):
            codes = self.teacher_codes[layer] = self.clt.encode_layer(layer, teacher_x)
            return codes if index == slice(None) else codes.take_tokens(index)
        both = self.clt.encode_layer(layer, torch.cat([teacher_x, x], dim=-2))
        n_teacher = teacher_x.shape[-2]
        self.teacher_codes[layer] = both.take_tokens(slice(None, n_teacher))
        return both.take_tokens(slice(n_teacher, None))

    def _add_terms(self, total: torch.Tensor | None, source: int, codes: SparseCodes,
                   weights: torch.Tensor | None, part: torch.Tensor | None = None) -> torch.Tensor:
        """Add source ``source``'s terms u_{s->l} (weighted by W[l, s]) to the running sums of every target; ``part``
        is those terms when already decoded."""
        if part is None:
            part = self.clt.decode_source(source, codes, self.sparse)  # [B, T', L - s, d]
        if weights is not None:
            column = weights[..., source:, source].to(part.device, part.dtype)  # [L - s] or [B, L - s]
            part = part * (column[:, None] if column.dim() == 1 else column[:, None, :, None])
        if total is None:
            total = torch.zeros(*part.shape[:-2], self.clt.config.n_layers, part.shape[-1], dtype=part.dtype,
                                device=part.device)
        total[..., source:, :] += part
        return total
