import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from clt_explorer.evaluation.metrics import (
    CKAAccumulator,
    FaithfulnessAccumulator,
    ReconstructionAccumulator,
    kl_divergence,
    linear_cka,
    reconstruction_quality,
    spearman_rows,
    top_k_overlap,
)


def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA through HSIC of linear kernels with the centring matrix H (Kornblith et al., eq. 3)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_linear_cka_matches_numpy_on_random_matrices():
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.normal(size=(60, 12))
        y = x @ rng.normal(size=(12, 8)) + rng.normal(size=(60, 8))
        assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(numpy_cka(x, y), rel=1e-9)


def test_cka_accumulated_in_batches_equals_one_shot_and_is_one_for_identity():
    torch.manual_seed(0)
    x, y = torch.randn(90, 7), torch.randn(90, 5)
    acc = CKAAccumulator()
    for i in range(0, 90, 25):
        acc.update(x[i:i + 25], y[i:i + 25])
    assert acc.result() == pytest.approx(linear_cka(x, y), rel=1e-9)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3 * x + 1) == pytest.approx(1.0, abs=1e-12)  # invariant to scale and shift


def test_kl_and_spearman_match_scipy():
    torch.manual_seed(0)
    a, b = torch.randn(5, 9), torch.randn(5, 9)
    p, q = scipy.special.softmax(a.numpy(), 1), scipy.special.softmax(b.numpy(), 1)
    assert np.allclose(kl_divergence(a, b).numpy(), scipy.special.rel_entr(p, q).sum(1), atol=1e-6)
    expected = [scipy.stats.spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy())]
    assert np.allclose(spearman_rows(a, b).numpy(), expected)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(5, dtype=torch.float64))


def test_top5_overlap_hand_made():
    a = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3]])
    b = torch.tensor([[9.0, 8, 7, 1, 0, 4, 3]])  # top-5 of b: 0,1,2,5,6 -> shares 0,1,2 with a's 0..4
    assert top_k_overlap(a, b, 5).item() == pytest.approx(3 / 5)


def test_faithfulness_on_a_hand_made_case():
    labels = torch.tensor([0, 1, 2, 0])
    teacher = torch.tensor([[5.0, 1, 0], [0, 5, 1], [0, 1, 5], [1, 5, 0]])  # correct, correct, correct, wrong
    surrogate = torch.tensor([[5.0, 1, 0], [5, 0, 1], [0, 1, 5], [5, 1, 0]])  # correct, wrong, correct, correct
    emb = torch.randn(4, 3)
    acc = FaithfulnessAccumulator(n_templates=2)
    templates_t = torch.stack([teacher, teacher])
    templates_s = torch.stack([surrogate, teacher])
    acc.update(labels, emb, emb, teacher, surrogate, templates_t, templates_s)
    r = acc.result()
    assert r["accuracy"] == 75.0 and r["teacher_accuracy"] == 75.0 and r["delta_acc"] == 0.0
    assert r["flip_pct"] == 50.0 and r["top1_agree"] == 50.0  # images 1 and 3 flip
    assert r["kl"] == pytest.approx(float(kl_divergence(teacher, surrogate).mean()))
    assert r["cos"] == pytest.approx(1.0) and r["cka"] == pytest.approx(1.0)
    assert r["prompt_kl"] == pytest.approx(float(kl_divergence(teacher, surrogate).mean()) / 2)
    assert np.isnan(r["prompt_r"])  # the teacher's accuracy is the same under both templates


def test_reconstruction_accumulator_reference_values():
    torch.manual_seed(0)
    y = torch.randn(2, 50, 4) + 3
    acc = ReconstructionAccumulator(2, 4)
    acc.update(y, y)
    perfect = acc.result()
    assert perfect["r2"] == pytest.approx([1.0, 1.0]) and perfect["mse"] == pytest.approx([0.0, 0.0])
    assert perfect["cosine"] == pytest.approx([1.0, 1.0])
    acc = ReconstructionAccumulator(2, 4)
    mean = y.mean(1, keepdim=True).expand_as(y)
    acc.update(y[:, :20], mean[:, :20])
    acc.update(y[:, 20:], mean[:, 20:])
    r = acc.result()
    assert r["r2"] == pytest.approx([0.0, 0.0], abs=1e-9)  # predicting the mean explains nothing
    assert r["mse"] == pytest.approx((y - mean).pow(2).mean((1, 2)).tolist(), rel=1e-6)


def test_reconstruction_quality_of_one_batch_agrees_with_the_float64_accumulator():
    torch.manual_seed(0)
    y = torch.randn(3, 50, 64) + 100 * torch.randn(3, 1, 64)  # channel means far above the spread: SST cancels
    yhat = y + 0.5 * torch.randn_like(y)
    accumulator = ReconstructionAccumulator(3, 64)
    accumulator.update(y, yhat)
    expected = accumulator.result()
    quality = reconstruction_quality(y, yhat)
    assert quality["r2"].dtype == torch.float32
    assert quality["r2"].tolist() == pytest.approx(expected["r2"], abs=1e-5)
    assert quality["cosine"].tolist() == pytest.approx(expected["cosine"], abs=1e-6)
    assert 0.5 < min(expected["r2"]) < max(expected["r2"]) < 1  # the case is neither trivial nor degenerate
    mean = y.mean(1, keepdim=True).expand_as(y)
    assert reconstruction_quality(y, mean)["r2"].tolist() == pytest.approx([0.0] * 3, abs=1e-5)
    assert reconstruction_quality(y, y.clone())["r2"].tolist() == [1.0] * 3
