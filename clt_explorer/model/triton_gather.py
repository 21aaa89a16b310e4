"""The sparse decoder on a GPU: ``out[n] = sum_j values[n, j] * weight[indices[n, j]]`` and its backward, in Triton.

A CLT's decoder reads k = 128 of F = 12,288 rows per token; a dense matmul does F/k times that arithmetic.
``F.embedding_bag`` gathers on a CUDA device too, but slowly and without a bfloat16 backward with per-sample
weights (LEADS.md), so a GPU decodes through these kernels when asked to gather (``sparse=True``). Each program owns
one block of BLOCK_D output columns, and the programs of one column block run next to each other (the token or
feature is the grid's fastest axis), so that the rows they read, F x BLOCK_D of the weight (6 MB in bfloat16 at
F = 12,288), can stay in the GPU's L2 cache while every token reads its k of them (a design choice, not yet measured).

- forward: one program per (token, column block) sums the token's k rows;
- the values' gradient: one program per (token, column block) takes the dot products of the k rows with the output's
  gradient over its columns, and the column blocks' partial sums are added up afterwards (in a fixed order);
- the weight's gradient: the (token, feature) pairs are sorted by feature, and one program per (feature, column
  block) sums its tokens' output gradients, each row written once (no atomics; rows no token used are zero).

Every sum runs in float32 and is stored in the inputs' dtype. Each launch is a ``triton_gather:...`` range for the
torch profiler (``scripts/bench_train.py --profile`` counts it among the gathers). The kernels also run on CPU tensors
under ``TRITON_INTERPRET=1`` (the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.profiler import record_function

# each kernel's blocks: the output columns a program owns (BLOCK_D), the codes (BLOCK_K) or (token, feature) pairs
# (BLOCK_P) it loads at once
GATHER_BLOCKS = {"BLOCK_K": 16, "BLOCK_D": 256}
VALUES_GRADIENT_BLOCKS = {"BLOCK_K": 16, "BLOCK_D": 256}
WEIGHT_GRADIENT_BLOCKS = {"BLOCK_P": 16, "BLOCK_D": 256}


@triton.jit
def _code_rows(weight, indices, token, first, K, D, columns, in_row, BLOCK_K: tl.constexpr):
    """Codes first..first + BLOCK_K of a token (their positions and which are real) and their rows' ``columns`` of
    the weight, in float32 (zeros outside)."""
    codes = first + tl.arange(0, BLOCK_K)
    in_codes = codes < K
    rows = tl.load(indices + token * K + codes, mask=in_codes, other=0).to(tl.int64)
    block = tl.load(weight + rows[:, None] * D + columns[None, :], mask=in_codes[:, None] & in_row[None, :], other=0.0)
    return codes, in_codes, block.to(tl.float32)


@triton.jit
def _gather_rows(weight, indices, values, out, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_row = columns < D
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, K, BLOCK_K):
        codes, in_codes, block = _code_rows(weight, indices, token, first, K, D, columns, in_row, BLOCK_K)
        scale = tl.load(values + token * K + codes, mask=in_codes, other=0.0).to(tl.float32)
        total += tl.sum(block * scale[:, None], axis=0)
    tl.store(out + token * D + columns, total.to(out.dtype.element_ty), mask=in_row)


@triton.jit
def _values_gradient(weight, indices, grad_out, partial, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    column_block = tl.program_id(1)
    columns = column_block * BLOCK_D + tl.arange(0, BLOCK_D)
    in_row = columns < D
    grad = tl.load(grad_out + token * D + columns, mask=in_row, other=0.0).to(tl.float32)
    for first in range(0, K, BLOCK_K):
        codes, in_codes, block = _code_rows(weight, indices, token, first, K, D, columns, in_row, BLOCK_K)
        dots = tl.sum(block * grad[None, :], axis=1)
        tl.store(partial + (column_block * tl.num_programs(0) + token) * K + codes, dots, mask=in_codes)


@triton.jit
def _weight_gradient(starts, tokens, scales, grad_out, grad_weight, D, BLOCK_P: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    feature = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_row = columns < D
    begin = tl.load(starts + feature)
    end = tl.load(starts + feature + 1)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(begin, end, BLOCK_P):
        pairs = first + tl.arange(0, BLOCK_P)
        in_pairs = pairs < end
        token = tl.load(tokens + pairs, mask=in_pairs, other=0)
        scale = tl.load(scales + pairs, mask=in_pairs, other=0.0).to(tl.float32)
        grad = tl.load(grad_out + token[:, None] * D + columns[None, :], mask=in_pairs[:, None] & in_row[None, :],
                       other=0.0)
        total += tl.sum(grad.to(tl.float32) * scale[:, None], axis=0)
    tl.store(grad_weight + feature * D + columns, total.to(grad_weight.dtype.element_ty), mask=in_row)


def _by_feature(indices: torch.Tensor, values: torch.Tensor, n_features: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, value) pairs of codes [N, K] grouped by feature: where each feature's pairs start ([F + 1]),
    their tokens and their values."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_features)
    starts = torch.zeros(n_features + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return starts, order // indices.shape[1], values.reshape(-1)[order]


class GatherDecode(torch.autograd.Function):
    """``gather_decode`` with gradients for the weight and the values (the indices have none)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor):
        (n_tokens, k), width = indices.shape, weight.shape[1]
        out = torch.empty(n_tokens, width, dtype=weight.dtype, device=weight.device)
        if n_tokens and k:
            with record_function("triton_gather:forward"):
                _gather_rows[(n_tokens, triton.cdiv(width, GATHER_BLOCKS["BLOCK_D"]))](
                    weight, indices, values, out, k, width, **GATHER_BLOCKS)
        else:
            out.zero_()
        ctx.save_for_backward(weight, indices, values)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, indices, values = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        (n_tokens, k), (n_features, width) = indices.shape, weight.shape
        grad_weight = grad_values = None
        if ctx.needs_input_grad[2]:
            column_blocks = triton.cdiv(width, VALUES_GRADIENT_BLOCKS["BLOCK_D"])
            partial = torch.empty(column_blocks, n_tokens, k, dtype=torch.float32, device=weight.device)
            if n_tokens and k:
                with record_function("triton_gather:values_gradient"):
                    _values_gradient[(n_tokens, column_blocks)](weight, indices, grad_out, partial, k, width,
                                                                **VALUES_GRADIENT_BLOCKS)
            else:
                partial.zero_()
            grad_values = partial.sum(0).to(values.dtype)
        if ctx.needs_input_grad[0]:
            grad_weight = torch.empty_like(weight)
            starts, tokens, scales = _by_feature(indices, values.detach(), n_features)
            with record_function("triton_gather:weight_gradient"):
                _weight_gradient[(n_features, triton.cdiv(width, WEIGHT_GRADIENT_BLOCKS["BLOCK_D"]))](
                    starts, tokens, scales, grad_out, grad_weight, width, **WEIGHT_GRADIENT_BLOCKS)
        return grad_weight, None, grad_values


def gather_decode(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """codes @ weight for codes held sparse (``indices``, ``values`` [..., K]; padding entries have value 0) and a
    weight [F, D]: [..., D] in the weight's dtype."""
    flat_indices = indices.reshape(-1, indices.shape[-1]).contiguous()
    flat_values = values.reshape(-1, values.shape[-1]).contiguous()
    out = GatherDecode.apply(weight.contiguous(), flat_indices, flat_values)
    return out.view(*indices.shape[:-1], weight.shape[1])
