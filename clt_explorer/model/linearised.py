"""The CLT replacement model of one image, linearised as circuit-tracer linearises a language model.

The model is the cascade the app shows: the CLT replaces the MLP outputs of blocks ``start..L-1`` for a token set
(its codes z_s computed from this pass's own x_s, the final layer keeping the term mask's sources), the teacher's
MLPs run everywhere else. At this image's pass (the *operating point*) the attention patterns and the LayerNorm
scales (the standard deviations that divide) are frozen. What is left is affine in the nodes of the attribution
graph:

- the input embeddings: the residual stream entering block 0 (after ``ln_pre``), one d-vector per token;
- the active features: the codes z_s(t)[f] at the replaced tokens, every layer (below ``start`` they are computed
  too, and write into the targets l >= start);
- the error nodes: what block l's MLP writes at token t beyond the features, one d-vector per (layer, token).
  Where the teacher's MLP runs (blocks below ``start``, tokens outside the set) that is its whole output y_l(t),
  a constant of the linearisation as circuit-tracer's error nodes are; where the CLT replaces it the replacement
  is exactly its features' terms plus b_dec, and the error node is zero.

:meth:`LinearisedReplacement.forward` maps node values to every block's MLP input x_l (so to every feature's
pre-activation, ``input_scale_l * x_l(t) . W_enc[l][:, f] + b_enc[l, f]``) and to the final residual at the CLS
token; at the operating point's values it reproduces the replaced pass (tested against
:meth:`Teacher.replace_mlps`). With ``live=True`` the active features follow their own pre-activations (gain 1 on
the active set, which z = pre gives for all three sparsifiers), so that a gradient there is a feature's total
effect through every path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .clt import CrossLayerTranscoder
from .sparsifiers import SparseCodes
from .teacher import Teacher
from .tokens import token_index


def _layer_norm_scale(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """The standard deviation a LayerNorm divides by, per token: [T]."""
    return (x.var(-1, unbiased=False) + module.eps).sqrt()


def _frozen_layer_norm(module: torch.nn.LayerNorm, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm with its scale frozen: affine in x (the mean is still subtracted)."""
    centred = x - x.mean(-1, keepdim=True)
    return centred / scale[:, None] * module.weight.float() + module.bias.float()


def _attention_parts(attn: torch.nn.MultiheadAttention):
    d = attn.embed_dim
    weight, bias = attn.in_proj_weight.float(), attn.in_proj_bias.float()
    return weight[:d], weight[d:2 * d], weight[2 * d:], bias[:d], bias[d:2 * d], bias[2 * d:]


def _attention_pattern(attn: torch.nn.MultiheadAttention, a: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities of one block at its input a [T, d]: [H, T, T]."""
    w_q, w_k, _, b_q, b_k, _ = _attention_parts(attn)
    heads = attn.num_heads
    q = (a @ w_q.T + b_q).unflatten(-1, (heads, -1)).transpose(0, 1)
    k = (a @ w_k.T + b_k).unflatten(-1, (heads, -1)).transpose(0, 1)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def _frozen_attention(attn: torch.nn.MultiheadAttention, a: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Multi-head attention with its pattern [H, T, T] frozen: affine in its input a [T, d] (the values)."""
    _, _, w_v, _, _, b_v = _attention_parts(attn)
    v = (a @ w_v.T + b_v).unflatten(-1, (attn.num_heads, -1)).transpose(0, 1)  # [H, T, dh]
    mixed = (pattern @ v).transpose(0, 1).flatten(-2)  # [T, d]
    return mixed @ attn.out_proj.weight.float().T + attn.out_proj.bias.float()


def _frozen_attention_transposed(attn: torch.nn.MultiheadAttention, g: torch.Tensor,
                                 pattern: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`_frozen_attention`'s linear part for cotangents g [R, T, d]."""
    _, _, w_v, _, _, _ = _attention_parts(attn)
    g = (g @ attn.out_proj.weight.float()).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # [R, H, T, dh]
    return (pattern.transpose(-1, -2) @ g).transpose(1, 2).flatten(-2) @ w_v


def _frozen_layer_norm_transposed(module: torch.nn.LayerNorm, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`_frozen_layer_norm`'s linear part for cotangents g [R, T, d]."""
    v = g * module.weight.float() / scale[:, None]
    return v - v.mean(-1, keepdim=True)


class LinearisedReplacement:
    """One image's replacement model, frozen at its pass (see the module's docstring).

    Held per graph: the operating point (embeddings, LayerNorm scales, attention patterns, error nodes, codes) and,
    per active feature, its encoder column and its decoder rows (gathered in fp32: a CLT held in bf16 is never
    cast whole)."""

    @torch.no_grad()
    def __init__(self, teacher: Teacher, clt: CrossLayerTranscoder, pixels: torch.Tensor, start: int, tokens: str,
                 term_weights: torch.Tensor | None = None):
        if pixels.shape[0] != 1:
            raise ValueError(f"an attribution graph is built for one image, got a batch of {pixels.shape[0]}")
        if term_weights is not None and term_weights.dim() != 2:
            raise ValueError("an attribution graph takes one [L, L] term mask")
        self.teacher, self.clt, self.start, self.tokens = teacher, clt, start, tokens
        self.index = token_index(tokens)
        self.n_layers, self.n_tokens = teacher.n_layers, teacher.n_tokens
        self.term_weights = None if term_weights is None else term_weights.float().cpu()
        self._operating_point(pixels.to(teacher.device))
        device = self.embeddings.device
        self.encoder_columns = []  # per layer [T', m, d]: input_scale_l * W_enc[l][:, f] of each active entry
        for layer, codes in enumerate(self.codes):
            columns = clt.W_enc[layer].T[codes.indices.to(clt.W_enc.device)].float().to(device)
            self.encoder_columns.append(columns * float(clt.input_scale[layer]))
        self.decoder_rows = {}  # (source, target) -> [T', m, d]: W[target, source] * W_dec[source -> target][f]
        for source, codes in enumerate(self.codes):
            for target in range(max(source, start), self.n_layers):
                weight = self.term_weight(target, source)
                if weight:
                    rows = clt.W_dec[source][codes.indices.to(clt.W_enc.device), target - source]
                    self.decoder_rows[source, target] = weight * rows.float().to(device)

    def term_weight(self, target: int, source: int) -> float:
        return 1.0 if self.term_weights is None else float(self.term_weights[target, source])

    def _operating_point(self, pixels: torch.Tensor) -> None:
        """Run the replaced pass once with the real LayerNorms, softmax and sparsifier, recording what the
        linearisation freezes. The CLT's codes come from :meth:`CrossLayerTranscoder.encode_layer`, as in the
        surrogate."""
        teacher, clt, index = self.teacher, self.clt, self.index
        h = teacher.embed(pixels)[0].float()
        self.embeddings = h.clone()
        ln1, ln2, patterns, errors, codes, xs = [], [], [], [], [], []
        replaced = torch.zeros(self.n_tokens, dtype=torch.bool, device=h.device)
        replaced[index] = True
        terms = None  # [T', L, d]: the features' weighted terms summed per target
        for layer, block in enumerate(teacher.blocks):
            ln1.append(_layer_norm_scale(block.ln_1, h))
            a = block.ln_1(h)
            patterns.append(_attention_pattern(block.attn, a))
            mid = h + block.ls_1(_frozen_attention(block.attn, a, patterns[-1]))
            ln2.append(_layer_norm_scale(block.ln_2, mid))
            x = block.ln_2(mid)
            xs.append(x)
            layer_codes = clt.encode_layer(layer, x[index][None])  # one image: [1, T', ...]
            codes.append(SparseCodes(layer_codes.values[0].float(), layer_codes.indices[0],
                                     n_features=layer_codes.n_features))
            part = clt.decode_source(layer, layer_codes)[0].float()  # [T', L - s, d]
            part = part * torch.tensor([self.term_weight(target, layer) for target in range(layer, self.n_layers)],
                                       device=part.device)[None, :, None]
            if terms is None:
                terms = part.new_zeros(part.shape[0], self.n_layers, part.shape[-1])
            terms[:, layer:] += part
            y = block.mlp(x).float()
            error = y.clone()
            if layer >= self.start:
                y[index] = terms[:, layer] + clt.b_dec[layer].float()
                error[replaced] = 0
            errors.append(error)
            h = mid + block.ls_2(y)
        self.ln1_scales, self.ln2_scales = torch.stack(ln1), torch.stack(ln2)
        self.patterns, self.errors, self.codes = torch.stack(patterns), torch.stack(errors), codes
        self.xs, self.final_cls = torch.stack(xs), h[0]

    @property
    def values(self) -> list[torch.Tensor]:
        """The operating point's feature values per layer [T', m] (padding entries 0)."""
        return [codes.values for codes in self.codes]

    def forward(self, embeddings: torch.Tensor, errors: torch.Tensor, values: list[torch.Tensor],
                live: bool = False, nudges: list[torch.Tensor] | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every block's MLP input x_l [T, d] and the final residual at the CLS token [d] for node values:
        ``embeddings`` [T, d], ``errors`` [L, T, d], feature ``values`` per layer [T', m]. With ``live`` the features'
        values are their pre-activations on the active set (``values`` only says which entries are active) plus
        ``nudges`` (per layer [T', m]), whose gradients are then total effects per unit."""
        teacher, index, b_dec = self.teacher, self.index, self.clt.b_dec
        h, xs, used = embeddings, [], []
        for layer, block in enumerate(teacher.blocks):
            a = _frozen_layer_norm(block.ln_1, h, self.ln1_scales[layer])
            mid = h + block.ls_1(_frozen_attention(block.attn, a, self.patterns[layer]))
            x = _frozen_layer_norm(block.ln_2, mid, self.ln2_scales[layer])
            xs.append(x)
            value = values[layer]
            if live:
                pre = self.preactivations(layer, x)
                value = torch.where(value != 0, pre, torch.zeros_like(pre))
                if nudges is not None:
                    value = value + nudges[layer]
            used.append(value)
            out = errors[layer]
            if layer >= self.start:
                written = b_dec[layer].float().to(x.device)
                for source in range(layer + 1):
                    rows = self.decoder_rows.get((source, layer))
                    if rows is not None:
                        written = written + torch.einsum("tm,tmd->td", used[source], rows)
                out = out + F.pad(written, (0, 0, index.start or 0, self.n_tokens - (index.stop or self.n_tokens)))
            h = mid + block.ls_2(out)
        return xs, h[0]

    def preactivations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations of layer ``layer``'s active entries [T', m] from its MLP input x [T, d]."""
        b_enc = self.clt.b_enc[layer].float().to(x.device)[self.codes[layer].indices]
        return (x[self.index][:, None, :] * self.encoder_columns[layer]).sum(-1) + b_enc

    def edges(self, layer: int, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """Direct effects on R targets read off block ``layer``'s MLP input by ``seeds`` [R, T, d] (a feature's row
        is its encoder column at its token), or, with ``layer`` = L, off the final residual at the CLS token by
        ``seeds`` [R, d]: one transposed pass of the linearised model for all R rows. Returns the edges from the
        embeddings [R, T], from the error nodes [R, L, T] and from each layer's code entries [R, T', m] (None for
        layers that cannot reach the targets)."""
        L, index, blocks = self.n_layers, self.index, self.teacher.blocks
        R = seeds.shape[0]
        from_errors = seeds.new_zeros(R, L, self.n_tokens)
        from_values: list[torch.Tensor | None] = [None] * L
        if layer == L:  # g: the cotangent on the residual stream leaving the block at hand
            g = seeds.new_zeros(R, self.n_tokens, seeds.shape[-1])
            g[:, 0] = seeds
        for block_index in range(min(layer, L - 1), -1, -1):
            block = blocks[block_index]
            if block_index == layer:  # the targets read this block's MLP input: start from its seeds
                g = _frozen_layer_norm_transposed(block.ln_2, seeds, self.ln2_scales[layer])
            else:  # through the MLP output: to the error nodes and, where the CLT writes, to the codes
                out = block.ls_2(g)
                from_errors[:, block_index] = (out * self.errors[block_index]).sum(-1)
                if block_index >= self.start:
                    written = out[:, index]
                    for source in range(block_index + 1):
                        rows = self.decoder_rows.get((source, block_index))
                        if rows is not None:
                            grad = torch.einsum("rtd,tmd->rtm", written, rows)
                            from_values[source] = grad if from_values[source] is None else from_values[source] + grad
            g = g + _frozen_layer_norm_transposed(
                block.ln_1, _frozen_attention_transposed(block.attn, block.ls_1(g), self.patterns[block_index]),
                self.ln1_scales[block_index])
        values = [None if v is None else v * self.values[s] for s, v in enumerate(from_values)]
        return (g * self.embeddings).sum(-1), from_errors, values
