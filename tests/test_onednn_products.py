import copy

import pytest
import torch
import torch.nn.functional as F

from clt_explorer.model import onednn_products
from clt_explorer.model.onednn_products import attention_forward, linear, route_products

needs_onednn = pytest.mark.skipif(not onednn_products.AVAILABLE, reason="this torch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape", [(50, 96), (2, 50, 96), (1, 7, 3, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_the_float64_product_to_float_rounding(shape, bias, inner_products):
    torch.manual_seed(0)
    x, weight = torch.randn(shape), torch.randn(80, 96)
    b = torch.randn(80) if bias else None
    expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
    found = linear(x, weight, b)
    assert found.shape == expected.shape and found.dtype == torch.float32
    assert torch.allclose(found.double(), expected, atol=1e-4, rtol=1e-5)
    assert inner_products == [shape]


@needs_onednn
def test_linear_reads_non_contiguous_inputs(inner_products):
    torch.manual_seed(0)
    x, weight, b = torch.randn(96, 50).t(), torch.randn(80, 96), torch.randn(80)
    assert torch.allclose(linear(x, weight, b), F.linear(x, weight, b), atol=1e-5)
    assert inner_products == [(50, 96)]


def test_linear_leaves_autograd_other_dtypes_and_devices_to_torch(inner_products):
    torch.manual_seed(0)
    weight = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(4, 16)
    out = linear(x, weight)
    out.sum().backward()  # autograd sees the product: the gradient of sum(x W^T) by W is the column sums of x
    assert torch.allclose(weight.grad, x.sum(0).expand(8, 16))
    with torch.no_grad():  # the same weight without autograd: oneDNN's where available
        linear(x, weight)
    for dtype in (torch.float64, torch.bfloat16):
        other, other_weight = x.to(dtype), weight.detach().to(dtype)
        assert torch.equal(linear(other, other_weight), F.linear(other, other_weight))
    on_meta = linear(torch.zeros(4, 16, device="meta"), torch.zeros(8, 16, device="meta"))  # stands for an accelerator
    assert on_meta.shape == (4, 8)
    assert torch.equal(linear(x[0], weight.detach()), F.linear(x[0], weight.detach()))  # one vector
    assert inner_products == ([(4, 16)] if onednn_products.AVAILABLE else [])


@pytest.fixture
def attention():
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(96, 4, batch_first=True).eval().requires_grad_(False)
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    return attn


@needs_onednn
def test_the_attention_forward_is_the_modules_own(attention, inner_products):
    x = torch.randn(2, 50, 96)
    with torch.no_grad():
        expected, _ = attention(x, x, x, need_weights=False)
        found, weights = attention_forward(attention)(x, x, x, need_weights=False)
    assert weights is None and found.shape == expected.shape
    assert torch.allclose(found, expected, atol=1e-5)
    assert inner_products == [(2, 50, 96), (2, 50, 96)]  # the input and output projections


def test_the_attention_forward_leaves_other_calls_to_the_module(attention, inner_products):
    x, other = torch.randn(2, 50, 96), torch.randn(2, 50, 96)
    own, routed = copy.deepcopy(attention), attention_forward(attention)
    mask = torch.zeros(50, 50, dtype=torch.bool)
    mask[:, 10:] = True
    with torch.no_grad():
        for args, kwargs in [((x, x, x), {}),  # its weights asked for
                             ((x, other, other), {"need_weights": False}),  # not self-attention
                             ((x, x, x), {"need_weights": False, "attn_mask": mask})]:
            expected, expected_weights = own(*args, **kwargs)
            found, found_weights = routed(*args, **kwargs)
            assert torch.equal(found, expected)
            assert (found_weights is None) == (expected_weights is None)
    tokens_first = torch.nn.MultiheadAttention(96, 4)
    assert attention_forward(tokens_first) == tokens_first.forward
    assert inner_products == []


def test_routed_products_follow_the_weights_and_keep_autograd(inner_products):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    reference = copy.deepcopy(block)
    route_products(block)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert torch.allclose(block(x), reference(x), atol=1e-5)
        block[0].weight.mul_(2)  # the forward reads the module's parameters at every call
        reference[0].weight.mul_(2)
        assert torch.allclose(block(x), reference(x), atol=1e-5)
    x.requires_grad_(True)
    block(x).sum().backward()
    assert x.grad is not None and block[0].weight.grad is not None
    assert len(inner_products) == (4 if onednn_products.AVAILABLE else 0)
