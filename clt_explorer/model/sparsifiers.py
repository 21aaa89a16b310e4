"""Sparsifiers: objects that turn encoder pre-activations into sparse codes, found by name in a registry.

A sparsifier owns everything that depends on its kind: its selection rule, its parameters (JumpReLU:
per-feature fp32 thresholds), their initialisation from data, its training penalty (JumpReLU: keep
the mean L0 near k) and the selection AuxK uses for dead features. Nothing else branches on its name:
a new kind (e.g. BatchTopK) is one subclass decorated with :func:`register`.

Codes are carried as :class:`SparseCodes` (the active indices and their values, padded to a fixed
width per token), so that decoding can gather only the active decoder rows; ``dense()`` gives the
[..., F] tensor with zeros where inactive. Activity is ``!= 0`` for every kind (Abs-TopK codes can
be negative).
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar

import torch
from torch import nn

from .heap_topk import top_indices


class SparseCodes:
    """Codes of one layer, held sparse (``values``, ``indices`` [..., m]; padding entries have value 0)
    or dense ([..., F], zeros where inactive); each form is computed from the other on first use."""

    def __init__(self, values: torch.Tensor | None = None, indices: torch.Tensor | None = None, *,
                 n_features: int, dense: torch.Tensor | None = None):
        if dense is None and (values is None or indices is None):
            raise ValueError("SparseCodes needs values and indices, or a dense tensor")
        self._values, self._indices, self._dense = values, indices, dense
        self.n_features = n_features
        self.held_sparse = dense is None  # made in the sparse form: decoding can gather without searching first

    @classmethod
    def from_dense(cls, z: torch.Tensor) -> "SparseCodes":
        return cls(n_features=z.shape[-1], dense=z)

    def _gather_active(self) -> None:
        z = self._dense
        width = int((z != 0).sum(-1).max()) if z.numel() else 0
        self._indices = z.abs().topk(max(1, width), dim=-1, sorted=False).indices
        self._values = z.gather(-1, self._indices)

    @property
    def values(self) -> torch.Tensor:
        if self._values is None:
            self._gather_active()
        return self._values

    @property
    def indices(self) -> torch.Tensor:
        if self._indices is None:
            self._gather_active()
        return self._indices

    def dense(self) -> torch.Tensor:
        """The [..., F] code tensor, zeros where inactive (differentiable in the values)."""
        if self._dense is None:
            out = self._values.new_zeros(*self._values.shape[:-1], self.n_features)
            self._dense = out.scatter(-1, self._indices, self._values)
        return self._dense

    def cpu(self) -> "SparseCodes":
        """The same codes on the CPU (detached), in the form they are held."""
        if self._dense is not None and self._values is None:
            return SparseCodes.from_dense(self._dense.detach().cpu())
        return SparseCodes(self.values.detach().cpu(), self.indices.cpu(), n_features=self.n_features)

    def take_tokens(self, index: slice) -> "SparseCodes":
        """The codes of some tokens: ``index`` applies to the axis before the feature axis."""
        if self._dense is not None:
            return SparseCodes.from_dense(self._dense[..., index, :])
        return SparseCodes(self._values[..., index, :], self._indices[..., index, :], n_features=self.n_features)

    def active(self) -> torch.Tensor:
        """Which entries of the sparse form are active (``!= 0``: Abs-TopK codes can be negative)."""
        return self.values.detach() != 0

    def feature_counts(self) -> torch.Tensor:
        """How many tokens each feature is active at ([F], int64), read from the form the codes are held in: no search
        for the nonzero entries of codes held dense, and no shape that depends on the data (so no host sync on a
        GPU)."""
        if not self.held_sparse:
            return (self.dense().detach() != 0).reshape(-1, self.n_features).sum(0)
        counts = torch.zeros(self.n_features, dtype=torch.long, device=self._indices.device)
        return counts.index_add_(0, self._indices.reshape(-1), self.active().reshape(-1).long())

    def l0(self) -> torch.Tensor:
        """Number of active codes per token."""
        if self._dense is not None:
            return (self._dense != 0).sum(-1)
        return (self._values != 0).sum(-1)

    def scaled(self, scale: torch.Tensor) -> "SparseCodes":
        """Codes with feature f multiplied by ``scale[f]`` (a [F] tensor): an edit between encode and decode."""
        return SparseCodes(self.values * scale.to(self.values.dtype)[self.indices], self.indices,
                           n_features=self.n_features)


def paired_codes(first: SparseCodes, second: SparseCodes) -> SparseCodes | None:
    """Two sets of codes of the same tokens [..., T, ·] as one [..., T, 2, ·], token t's of both side by side, held
    in their common form (None where the forms or the sparse widths differ)."""
    if first.held_sparse != second.held_sparse:
        return None
    if not first.held_sparse:
        dense = first.dense(), second.dense()
        return SparseCodes.from_dense(torch.stack(dense, -2)) if dense[0].shape == dense[1].shape else None
    if first.values.shape != second.values.shape:
        return None
    return SparseCodes(torch.stack([first.values, second.values], -2), torch.stack([first.indices, second.indices], -2),
                       n_features=first.n_features)


def relu_topk(pre: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> SparseCodes:
    """Keep the k largest entries of relu(pre) (among the ``allowed`` features, when given): codes are >= 0."""
    scores = pre if allowed is None else pre.masked_fill(~allowed, float("-inf"))
    indices = top_indices(scores, k)
    return SparseCodes(pre.gather(-1, indices).relu(), indices, n_features=pre.shape[-1])


def abs_topk(pre: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> SparseCodes:
    """Keep the k entries of largest |pre| (among the ``allowed`` features, when given) with their sign."""
    scores = pre.abs() if allowed is None else pre.abs().masked_fill(~allowed, float("-inf"))
    indices = top_indices(scores, k)
    return SparseCodes(pre.gather(-1, indices), indices, n_features=pre.shape[-1])


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1[|u| < 1/2] of the straight-through estimator."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta); d z / d theta = -(theta / eps) K((pre - theta) / eps)  (Rajamanoharan et al.)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        pre32 = pre.float()
        ctx.save_for_backward(pre32, threshold)
        ctx.bandwidth = bandwidth
        ctx.pre_dtype = pre.dtype
        return (pre32 * (pre32 > threshold)).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad = grad_out.float()
        grad_pre = (grad * (pre > threshold)).to(ctx.pre_dtype)
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return grad_pre, _sum_to(grad_threshold, threshold.shape), None


class _Step(torch.autograd.Function):
    """H(pre - theta) with d H / d theta = -(1 / eps) K((pre - theta) / eps): the L0 penalty's gradient."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        pre32 = pre.float()
        ctx.save_for_backward(pre32, threshold)
        ctx.bandwidth = bandwidth
        return (pre32 > threshold).float()

    @staticmethod
    def backward(ctx, grad_out):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad_out
        return None, _sum_to(grad_threshold, threshold.shape), None


class _JumpReLUReached(torch.autograd.Function):
    """:class:`_JumpReLU` held sparse, for a decoder that gathers: per token, every feature the straight-through
    gradient reaches (pre - theta > -eps/2: the active ones, and the inactive ones near their threshold with value 0),
    padded with zero-valued features to the batch's largest count. Its gradients are _JumpReLU's, read at those
    features only: elsewhere both the code and the rectangle are zero."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        pre32 = pre.float()
        margin = pre32 - threshold
        reached = (margin > 0) | (_rectangle(margin / bandwidth) > 0)  # each token's largest margins
        width = max(1, int(reached.sum(-1).max())) if reached.numel() else 1
        indices = margin.topk(width, dim=-1, sorted=False).indices
        picked, kept = pre32.gather(-1, indices), threshold[indices]
        ctx.save_for_backward(indices, picked, kept)
        ctx.bandwidth, ctx.pre_shape, ctx.pre_dtype = bandwidth, pre.shape, pre.dtype
        ctx.mark_non_differentiable(indices)
        return (picked * (picked > kept)).to(pre.dtype), indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        indices, picked, kept = ctx.saved_tensors
        eps = ctx.bandwidth
        grad = grad_values.float()
        grad_pre = grad.new_zeros(ctx.pre_shape).scatter_(-1, indices, grad * (picked > kept)).to(ctx.pre_dtype)
        per_entry = -(kept / eps) * _rectangle((picked - kept) / eps) * grad
        grad_threshold = per_entry.new_zeros(ctx.pre_shape[-1])
        return grad_pre, grad_threshold.index_add_(0, indices.reshape(-1), per_entry.reshape(-1)), None


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to the parameter's shape."""
    return grad.reshape(-1, *shape).sum(0) if grad.shape != shape else grad


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> SparseCodes:
    """JumpReLU with a per-feature fp32 threshold [F], trained by the straight-through estimator."""
    return SparseCodes.from_dense(_JumpReLU.apply(pre, threshold.float(), bandwidth))


def jumprelu_reached(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> SparseCodes:
    """:func:`jumprelu` held sparse with every code its straight-through gradient reaches, for a gathering decoder."""
    values, indices = _JumpReLUReached.apply(pre, threshold.float(), bandwidth)
    return SparseCodes(values, indices, n_features=pre.shape[-1])


def jumprelu_l0(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Mean number of active features per token, differentiable in the threshold (for the penalty)."""
    return _Step.apply(pre, threshold.float(), bandwidth).sum(-1).mean()


SPARSIFIERS: dict[str, type["Sparsifier"]] = {}


def register(cls: type["Sparsifier"]) -> type["Sparsifier"]:
    """Make a sparsifier class available by its ``name`` (in configs, the command line and the tables)."""
    SPARSIFIERS[cls.name] = cls
    return cls


def sparsifier_class(name: str) -> type["Sparsifier"]:
    if name not in SPARSIFIERS:
        raise ValueError(f"unknown sparsifier {name!r}; choose one of {tuple(SPARSIFIERS)}")
    return SPARSIFIERS[name]


class Sparsifier(nn.Module):
    """Pre-activations [..., F] of one layer -> :class:`SparseCodes`. Subclasses set ``name`` (registry key)
    and ``short_name`` (table columns) and implement :meth:`forward`; parameters they register stay fp32."""

    name: ClassVar[str]
    short_name: ClassVar[str]

    def __init__(self, n_layers: int, n_features: int, k: int):
        super().__init__()
        self.n_layers, self.n_features, self.k = n_layers, n_features, k

    @classmethod
    def from_config(cls, config, device: torch.device | str | None = None) -> "Sparsifier":
        """The sparsifier a CLT config asks for (``config`` has n_layers, n_features, k and the kind's options)."""
        return cls(config.n_layers, config.n_features, config.k)

    def forward(self, layer: int, pre: torch.Tensor) -> SparseCodes:
        raise NotImplementedError

    def codes_to_gather(self, layer: int, pre: torch.Tensor) -> SparseCodes:
        """The codes a decoder that gathers reads: :meth:`forward`'s, for kinds whose gradient reaches only the
        active codes."""
        return self(layer, pre)

    def select(self, pre: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> SparseCodes:
        """The k strongest non-negative codes: what AuxK reconstructs the residual with (overridden by
        kinds whose codes can be negative)."""
        return relu_topk(pre, k, allowed)

    def aux_codes(self, pre: torch.Tensor, dead: torch.Tensor, k: int) -> SparseCodes:
        """AuxK's codes: the k strongest dead features [F] of every token of ``pre`` [N, F] (k at most the number of
        dead features, which the caller knows)."""
        return self.select(pre, k, dead)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Data-independent start of the kind's own parameters (none by default)."""

    @torch.no_grad()
    def initialize(self, layer: int, pre: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Data-dependent start from one layer's pre-activations [N, F]; ``reduce`` averages across ranks."""

    def penalty(self, pre: list[torch.Tensor]) -> torch.Tensor | None:
        """A training penalty over every layer's pre-activations, or None when the kind has none."""
        return None


@register
class ReLUTopK(Sparsifier):
    """Keep the k largest entries of relu(pre), zero the rest: codes are >= 0."""

    name, short_name = "relu_topk", "RTK"

    def forward(self, layer: int, pre: torch.Tensor) -> SparseCodes:
        return relu_topk(pre, self.k)


@register
class AbsTopK(Sparsifier):
    """Keep the k entries of largest |pre| with their sign: codes can be negative."""

    name, short_name = "abs_topk", "ATK"

    def forward(self, layer: int, pre: torch.Tensor) -> SparseCodes:
        return abs_topk(pre, self.k)

    def select(self, pre: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> SparseCodes:
        return abs_topk(pre, k, allowed)


@register
class JumpReLU(Sparsifier):
    """z = pre * 1[pre > theta] with a learned per-feature threshold theta = exp(log_threshold) (fp32: in
    bf16 thresholds stop moving), trained through the straight-through estimator with a rectangle kernel of
    width ``bandwidth``; the penalty ((L0 - k) / k)^2 keeps the mean L0 near k."""

    name, short_name = "jumprelu", "JR"

    def __init__(self, n_layers: int, n_features: int, k: int, bandwidth: float = 0.1,
                 device: torch.device | str | None = None):
        super().__init__(n_layers, n_features, k)
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.empty(n_layers, n_features, device=device, dtype=torch.float32))
        if self.log_threshold.device.type != "meta":
            self.reset_parameters()

    @classmethod
    def from_config(cls, config, device: torch.device | str | None = None) -> "JumpReLU":
        return cls(config.n_layers, config.n_features, config.k, config.jumprelu_bandwidth, device)

    def threshold(self, layer: int) -> torch.Tensor:
        """Thresholds theta_l [F] (fp32)."""
        return self.log_threshold[layer].exp()

    def forward(self, layer: int, pre: torch.Tensor) -> SparseCodes:
        return jumprelu(pre, self.threshold(layer), self.bandwidth)

    def codes_to_gather(self, layer: int, pre: torch.Tensor) -> SparseCodes:
        """In training, held sparse with the inactive codes the straight-through gradient reaches (value 0), which a
        gather of the nonzero ones would drop; otherwise :meth:`forward`'s, held dense (gathered by their nonzero
        entries, each token's own count)."""
        if torch.is_grad_enabled() and (pre.requires_grad or self.log_threshold.requires_grad):
            return jumprelu_reached(pre, self.threshold(layer), self.bandwidth)
        return self(layer, pre)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.log_threshold.fill_(math.log(0.5))

    @torch.no_grad()
    def initialize(self, layer: int, pre: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Thresholds at each feature's (1 - k/F) quantile, so that the initial L0 is near k."""
        n_tokens = pre.shape[0]
        kth = max(1, min(n_tokens, math.ceil(n_tokens * (1 - self.k / self.n_features))))
        quantile = pre.float().kthvalue(kth, dim=0).values.clamp_min(1e-3)
        self.log_threshold[layer].copy_(reduce(quantile.log()))

    def penalty(self, pre: list[torch.Tensor]) -> torch.Tensor:
        l0 = torch.stack([jumprelu_l0(p, self.threshold(layer), self.bandwidth) for layer, p in enumerate(pre)])
        return ((l0 - self.k) / self.k).pow(2).mean()
