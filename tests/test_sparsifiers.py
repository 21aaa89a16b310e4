import numpy as np
import pytest
import torch

from clt_explorer.sparsifiers import SparseCodes, abs_topk, jumprelu, jumprelu_l0, relu_topk, sparsify


@pytest.fixture
def pre():
    torch.manual_seed(0)
    return torch.randn(64, 300)


def test_relu_topk_matches_numpy_reference(pre):
    codes = relu_topk(pre, 16).dense()
    reference = np.zeros_like(pre.numpy())
    for row, values in enumerate(np.maximum(pre.numpy(), 0)):
        keep = np.argsort(-values)[:16]
        reference[row, keep] = values[keep]
    assert np.array_equal(codes.numpy(), reference)
    assert (codes >= 0).all()
    assert ((codes != 0).sum(-1) <= 16).all()


def test_relu_topk_keeps_fewer_when_fewer_are_positive():
    pre = torch.tensor([[-1.0, -2.0, 0.5, -0.1]])
    codes = relu_topk(pre, 3).dense()
    assert codes.tolist() == [[0.0, 0.0, 0.5, 0.0]]


def test_abs_topk_keeps_largest_magnitudes_with_sign(pre):
    codes = abs_topk(pre, 16).dense()
    reference = np.zeros_like(pre.numpy())
    for row, values in enumerate(pre.numpy()):
        keep = np.argsort(-np.abs(values))[:16]
        reference[row, keep] = values[keep]
    assert np.array_equal(codes.numpy(), reference)
    assert (codes < 0).any(), "abs_topk must keep negative codes"
    assert ((codes != 0).sum(-1) == 16).all()


def test_jumprelu_forward_and_straight_through_gradient(pre):
    theta = torch.full((300,), 0.8, requires_grad=True)
    bandwidth = 0.2
    codes = jumprelu(pre, theta, bandwidth)
    assert torch.equal(codes.dense(), pre * (pre > 0.8))
    codes.dense().sum().backward()
    # d/dtheta sum_t z = -(theta / eps) * sum_t K((pre - theta) / eps), K = 1[|u| < 1/2]
    window = ((pre - 0.8).abs() < bandwidth / 2).float().sum(0)
    assert torch.allclose(theta.grad, -(0.8 / bandwidth) * window)


def test_jumprelu_l0_value_and_gradient(pre):
    theta = torch.full((300,), 0.5, requires_grad=True)
    l0 = jumprelu_l0(pre, theta, 0.1)
    assert torch.isclose(l0, (pre > 0.5).float().sum(-1).mean())
    l0.backward()
    window = ((pre - 0.5).abs() < 0.05).float().sum(0) / pre.shape[0]
    assert torch.allclose(theta.grad, -window / 0.1)


def test_jumprelu_threshold_stays_fp32_under_bf16_inputs(pre):
    theta = torch.full((300,), 0.8, requires_grad=True)
    codes = jumprelu(pre.bfloat16(), theta, 0.2)
    codes.dense().float().sum().backward()
    assert theta.grad.dtype == torch.float32 and theta.grad.abs().sum() > 0


def test_sparse_codes_round_trip(pre):
    dense = abs_topk(pre, 10).dense()
    again = SparseCodes.from_dense(dense)
    assert again.values.shape[-1] == 10
    assert torch.equal(SparseCodes(again.values, again.indices, n_features=300).dense(), dense)
    assert torch.equal(again.l0(), torch.full((64,), 10))


def test_unknown_sparsifier_is_rejected(pre):
    with pytest.raises(ValueError, match="unknown sparsifier"):
        sparsify("softmax", pre, 4)
