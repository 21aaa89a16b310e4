"""Sparsifiers that turn encoder pre-activations into sparse codes: jumprelu, relu_topk, abs_topk.

Codes are carried as :class:`SparseCodes` (the active indices and their values, padded to a fixed
width per token), so that decoding can gather only the active decoder rows; ``dense()`` gives the
[..., F] tensor with zeros where inactive. Abs-TopK codes can be negative: activity is ``!= 0``.
"""

from __future__ import annotations

import torch

SPARSIFIERS = ("jumprelu", "relu_topk", "abs_topk")


class SparseCodes:
    """Codes of one layer, held sparse (``values``, ``indices`` [..., m]; padding entries have value 0)
    or dense ([..., F], zeros where inactive); each form is computed from the other on first use."""

    def __init__(self, values: torch.Tensor | None = None, indices: torch.Tensor | None = None, *,
                 n_features: int, dense: torch.Tensor | None = None):
        if dense is None and (values is None or indices is None):
            raise ValueError("SparseCodes needs values and indices, or a dense tensor")
        self._values, self._indices, self._dense = values, indices, dense
        self.n_features = n_features

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

    def take_tokens(self, index: slice) -> "SparseCodes":
        """The codes of some tokens: ``index`` applies to the axis before the feature axis."""
        if self._dense is not None:
            return SparseCodes.from_dense(self._dense[..., index, :])
        return SparseCodes(self._values[..., index, :], self._indices[..., index, :], n_features=self.n_features)

    def l0(self) -> torch.Tensor:
        """Number of active codes per token."""
        if self._dense is not None:
            return (self._dense != 0).sum(-1)
        return (self._values != 0).sum(-1)


def relu_topk(pre: torch.Tensor, k: int) -> SparseCodes:
    """Keep the k largest entries of relu(pre), zero the rest: codes are >= 0."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return SparseCodes(values.relu(), indices, n_features=pre.shape[-1])


def abs_topk(pre: torch.Tensor, k: int) -> SparseCodes:
    """Keep the k entries of largest |pre| with their sign."""
    indices = pre.abs().topk(k, dim=-1, sorted=False).indices
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


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to the parameter's shape."""
    return grad.reshape(-1, *shape).sum(0) if grad.shape != shape else grad


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> SparseCodes:
    """JumpReLU with a per-feature fp32 threshold [F], trained by the straight-through estimator."""
    z = _JumpReLU.apply(pre, threshold.float(), bandwidth)
    return SparseCodes.from_dense(z)


def jumprelu_l0(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Mean number of active features per token, differentiable in the threshold (for the penalty)."""
    return _Step.apply(pre, threshold.float(), bandwidth).sum(-1).mean()


def sparsify(name: str, pre: torch.Tensor, k: int, threshold: torch.Tensor | None = None,
             bandwidth: float = 0.1) -> SparseCodes:
    """Dispatch on the sparsifier's name."""
    if name == "relu_topk":
        return relu_topk(pre, k)
    if name == "abs_topk":
        return abs_topk(pre, k)
    if name == "jumprelu":
        if threshold is None:
            raise ValueError("jumprelu needs a threshold")
        return jumprelu(pre, threshold, bandwidth)
    raise ValueError(f"unknown sparsifier {name!r}; choose one of {SPARSIFIERS}")
