"""The teacher's float32 products through oneDNN's inner product on a CPU, instead of the BLAS that torch calls.

An analysis at ViT-B/32 size runs 72 float32 products of 50 tokens (the teacher's pass: every block's attention
projections and MLP; the replaced pass: its attention projections). torch sends float32 products to MKL, which on an
AMD EPYC (Zen 4, 2 cores) ran the 48 of one pass in 73-75 ms, against 53-58 ms through oneDNN
(``torch.ops.mkldnn._linear_pointwise``, the operator torch's own compiler emits for CPU linear layers) on the same
weights, unpacked; the attention of 12 blocks as two such products around ``scaled_dot_product_attention`` took 22
ms against 27 in ``nn.MultiheadAttention``'s fused path. The numbers are the same to float rounding. Everything else
(autograd, other dtypes and devices, masks, attention weights asked for) keeps torch's own path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
INNER_PRODUCT = torch.ops.mkldnn._linear_pointwise if AVAILABLE else None


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN computes this product: float32 on a CPU, at least 2-D, nothing that autograd must see."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (AVAILABLE and x.dim() >= 2 and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., in], weight [out, in], through oneDNN where it applies."""
    if not _applies(x, weight, bias):
        return F.linear(x, weight, bias)
    return INNER_PRODUCT(x.contiguous(), weight, bias, "none", [None], "")


def linear_forward(module: torch.nn.Linear):
    """``module``'s forward through :func:`linear` (its parameters read at every call)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        return linear(x, module.weight, module.bias)
    return run


def attention_forward(attn: torch.nn.MultiheadAttention):
    """``attn``'s forward, as self-attention without masks and without its weights: the input and output projections
    through :func:`linear` around ``scaled_dot_product_attention``. Any other call, and a module whose layout this does
    not follow (keys and values of other widths, extra key/value biases, tokens first), keeps its own forward."""
    forward = attn.forward
    if (not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.bias_v is not None
            or attn.add_zero_attn):
        return forward

    def run(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True,
            is_causal=False):
        plain = (query is key is value and query.dim() == 3 and key_padding_mask is None and attn_mask is None
                 and not need_weights and not is_causal and not (attn.training and attn.dropout > 0)
                 and _applies(query, attn.in_proj_weight, attn.in_proj_bias))
        if not plain:
            return forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                           attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        batch, tokens, width = query.shape
        qkv = linear(query, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, head width]
        return linear(mixed.transpose(1, 2).reshape(batch, tokens, width), attn.out_proj.weight,
                      attn.out_proj.bias), None
    return run


def route_products(module: torch.nn.Module) -> None:
    """Give ``module``'s linear layers :func:`linear_forward` and its multi-head attentions :func:`attention_forward`.
    The projection inside a multi-head attention (a subclass of ``nn.Linear``) is left alone: its forward never runs."""
    for child in module.modules():
        if isinstance(child, torch.nn.MultiheadAttention):
            child.forward = attention_forward(child)
        elif type(child) is torch.nn.Linear:
            child.forward = linear_forward(child)
