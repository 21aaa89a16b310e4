import numpy as np
import pytest
import torch

from clt_explorer.model.sparsifiers import (
    SparseCodes,
    abs_topk,
    jumprelu,
    jumprelu_l0,
    jumprelu_reached,
    relu_topk,
    sparsifier_class,
)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jumprelu_held_sparse_for_a_gather_has_the_dense_codes_and_gradients(pre, dtype):
    """Held sparse with every code the straight-through gradient reaches (the active ones, the inactive ones within
    eps/2 below their threshold with value 0), padded with zero codes to the largest count: the same codes and the
    same gradients in the pre-activations and the thresholds as :func:`jumprelu`'s dense codes, for an upstream
    gradient that differs at every code (a decoder's)."""
    pre = pre.to(dtype)
    theta = torch.linspace(0.3, 1.2, 300)
    bandwidth = 0.4
    upstream = torch.randn(64, 300, generator=torch.Generator().manual_seed(1))
    found = {}
    for make in (jumprelu, jumprelu_reached):
        x, t = pre.clone().requires_grad_(), theta.clone().requires_grad_()
        codes = make(x, t, bandwidth)
        (codes.dense().float() * upstream).sum().backward()
        found[make] = codes, x.grad, t.grad
    (dense, *dense_grads), (held, *held_grads) = found[jumprelu], found[jumprelu_reached]
    assert held.held_sparse and torch.equal(held.dense(), dense.dense())
    margin = pre.float() - theta
    reached = (margin > 0) | ((margin / bandwidth).abs() < 0.5)
    assert held.values.shape == (64, int(reached.sum(-1).max()))
    assert (reached.sum(-1) > (margin > 0).sum(-1)).all()  # inactive codes near the threshold in every token
    assert reached.gather(-1, held.indices).sum() == reached.sum()  # every reached code is held
    assert torch.equal(held_grads[0], dense_grads[0])
    torch.testing.assert_close(held_grads[1], dense_grads[1], rtol=1e-6, atol=1e-5)
    assert dense_grads[1].abs().sum() > 0


def test_jumprelu_held_sparse_for_a_gather_of_no_tokens():
    pre = torch.zeros(0, 5, requires_grad=True)
    codes = jumprelu_reached(pre, torch.full((5,), 0.5), 0.1)
    assert codes.values.shape == (0, 1) and codes.dense().shape == (0, 5)


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


@pytest.mark.parametrize("make", [
    lambda pre: abs_topk(pre, 10),  # held sparse, negative codes included
    lambda pre: jumprelu_reached(pre, torch.full((300,), 0.8), 0.5),  # held sparse with zero-valued entries
    lambda pre: jumprelu(pre, torch.full((300,), 0.8), 0.5)])  # held dense
def test_feature_counts_are_the_tokens_each_feature_is_active_at(pre, make, monkeypatch):
    codes = make(pre.view(4, 16, 300))
    expected = (codes.dense() != 0).reshape(-1, 300).sum(0)
    if not codes.held_sparse:  # counted from the dense form, without searching its nonzero entries
        monkeypatch.setattr(SparseCodes, "_gather_active", lambda self: pytest.fail("searched the nonzero entries"))
    counts = codes.feature_counts()
    assert counts.dtype == torch.int64 and torch.equal(counts, expected) and 0 < counts.sum() < 64 * 300


def test_unknown_sparsifier_is_rejected():
    with pytest.raises(ValueError, match="unknown sparsifier 'softmax'; choose one of"):
        sparsifier_class("softmax")


@pytest.fixture
def batch_topk():
    """A fourth kind, BatchTopK (Bussmann et al. 2024: the k x N largest codes of a batch of N tokens), written as
    one class and a registry entry; removed again after the test."""
    from clt_explorer.model.sparsifiers import SPARSIFIERS, Sparsifier, register

    @register
    class BatchTopK(Sparsifier):
        name, short_name = "batch_topk", "BTK"

        def forward(self, layer, pre):
            flat = pre.relu().flatten()
            kept = flat.topk(min(self.k * pre[..., 0].numel(), flat.numel())).indices
            return SparseCodes.from_dense(torch.zeros_like(flat).scatter(0, kept, flat[kept]).view_as(pre))

    yield BatchTopK
    del SPARSIFIERS["batch_topk"]


def test_a_new_sparsifier_is_one_class_and_a_registry_entry(batch_topk, random_teacher, tmp_path):
    """Nothing else changes: the CLT encodes with it, training runs (AuxK, penalty, optimiser groups), and the
    trained CLT saves and loads by the kind's name."""
    from clt_explorer import CLTConfig, CrossLayerTranscoder
    from clt_explorer.data.synthetic import SyntheticShapes
    from clt_explorer.training.train import TrainConfig, train_clt

    config = CLTConfig(random_teacher.n_layers, random_teacher.d_model, 2, "batch_topk", 8)
    result = train_clt(random_teacher, SyntheticShapes("train", n_images=32, seed=2), config,
                       TrainConfig(epochs=2, lr=2e-3, batch_tokens=128, chunk_images=16, warmup_steps=1,
                                   dead_after_tokens=200), tmp_path, progress=False)
    assert result.steps > 0 and result.clt.config.sparsifier == "batch_topk"
    xs = torch.randn(random_teacher.n_layers, 10, random_teacher.d_model)
    codes = result.clt.encode(xs)
    assert ((codes != 0).sum((1, 2)) <= 8 * 10).all()  # k per token on average over the batch, not per token
    loaded = CrossLayerTranscoder.from_pretrained(tmp_path)
    assert isinstance(loaded.sparsifier, batch_topk) and torch.equal(loaded.encode(xs), codes)


@pytest.mark.parametrize("name", ["relu_topk", "abs_topk", "jumprelu"])
def test_aux_k_selects_the_strongest_dead_features_by_the_kinds_rule(name):
    """ReLU kinds take the largest pre-activations (made non-negative); Abs-TopK the largest magnitudes, signed."""
    pre = torch.tensor([[3.0, -5.0, 1.0, -0.5, 2.0]])
    dead = torch.tensor([False, True, True, True, False])
    sparsifier = sparsifier_class(name)(1, 5, 2)
    codes = sparsifier.aux_codes(pre, dead, 2).dense()
    expected = [[0, -5.0, 1.0, 0, 0]] if name == "abs_topk" else [[0, 0, 1.0, 0, 0]]
    assert codes.tolist() == expected
