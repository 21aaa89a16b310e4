"""Cases of the Triton sparse decoder, run on the CPU by test_triton_gather.py in a process of their own with
TRITON_INTERPRET=1 (set before triton is imported, which the interpreter needs)."""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from clt_explorer import CLTConfig, CrossLayerTranscoder
from clt_explorer.model import clt as clt_module
from clt_explorer.model.triton_gather import GATHER_BLOCKS, VALUES_GRADIENT_BLOCKS, gather_decode

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_triton_gather.py"


def sparse_codes(n_tokens: int, n_features: int, k: int, padded: int, seed: int):
    """Codes [N, k] of distinct features per token with negative values too (Abs-TopK's), the last ``padded`` of
    every token padding (feature 0, value 0), as a sparsifier pads."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n_features, generator=generator)[:k] for _ in range(n_tokens)])
    values = torch.randn(n_tokens, k, generator=generator)
    indices[:, k - padded:], values[:, k - padded:] = 0, 0.0
    return indices, values


def dense_decode(weight, indices, values):
    return torch.zeros(indices.shape[0], weight.shape[0], dtype=values.dtype).scatter_add(1, indices, values) @ weight


# widths and code counts that are not multiples of the kernels' blocks, one token, and more codes than a block
@pytest.mark.parametrize("n_tokens, n_features, width, k, padded", [
    (9, 300, 70, 20, 3), (1, 40, GATHER_BLOCKS["BLOCK_D"] + 5, GATHER_BLOCKS["BLOCK_K"], 0),
    (12, 200, 48, 2 * VALUES_GRADIENT_BLOCKS["BLOCK_K"] + 1, 5)])
def test_gather_and_its_gradients_equal_the_dense_products(n_tokens, n_features, width, k, padded):
    """The output, the weight's gradient (zero in rows no token uses) and the values' gradient equal those of the
    dense matmul of the scattered codes, in float32."""
    indices, values = sparse_codes(n_tokens, n_features, k, padded, seed=n_tokens)
    weight = torch.randn(n_features, width, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(n_tokens, width, generator=torch.Generator().manual_seed(2))
    results = []
    for decode in (gather_decode, dense_decode):
        w, v = weight.clone().requires_grad_(), values.clone().requires_grad_()
        out = decode(w, indices, v)
        out.backward(grad_out)
        results.append((out.detach(), w.grad, v.grad))
    (out, grad_weight, grad_values), (out_ref, grad_weight_ref, grad_values_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weight, grad_weight_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_values, grad_values_ref, rtol=1e-5, atol=1e-5)
    unused = torch.ones(n_features, dtype=torch.bool)
    unused[indices[values != 0]] = False
    assert unused.any() and not grad_weight[unused].any()


def test_a_clt_under_autocast_gathers_its_bfloat16_rows_as_the_matmul_would(monkeypatch):
    """Under autocast the gather reads the weight cast to bfloat16, as the dense matmul does: its output in bfloat16
    within bfloat16's rounding of the matmul's, and the float32 weight's gradient near the matmul's."""
    monkeypatch.setattr(clt_module, "_gathers_in_triton", lambda weight: True)
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(3, 16, 4, "relu_topk", 8))
    xs, ys = torch.randn(3, 12, 16), torch.randn(3, 12, 16)
    results = {}
    for sparse in (False, True):
        clt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = clt(xs, sparse=sparse)
            (out.yhat.float() - ys).pow(2).mean().backward()
        results[sparse] = out.yhat, clt.W_dec[0].grad
    (yhat, grad), (yhat_dense, grad_dense) = results[True], results[False]
    assert yhat.dtype == yhat_dense.dtype == torch.bfloat16 and grad.dtype == torch.float32
    torch.testing.assert_close(yhat.float(), yhat_dense.float(), rtol=2e-2, atol=2e-2)
    assert (grad - grad_dense).norm() / grad_dense.norm() < 2e-2


def test_no_tokens_decode_to_nothing_with_a_zero_weight_gradient():
    weight = torch.randn(10, 7, requires_grad=True)
    values = torch.zeros(0, 3, requires_grad=True)
    out = gather_decode(weight, torch.zeros(0, 3, dtype=torch.int64), values)
    out.sum().backward()
    assert out.shape == (0, 7) and not weight.grad.any() and values.grad.shape == (0, 3)


@pytest.mark.parametrize("sparsifier", ["relu_topk", "abs_topk", "jumprelu"])
def test_a_clt_trains_through_the_kernels_as_through_the_dense_decoder(sparsifier, monkeypatch):
    """A training pass of a CLT whose gathers run in the kernels (as on a GPU) gives the dense decoder's output and
    every parameter's gradient (the encoder's through the codes' values)."""
    monkeypatch.setattr(clt_module, "_gathers_in_triton", lambda weight: True)
    monkeypatch.setattr(clt_module.F, "embedding_bag", None)  # not reached
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(4, 12, 4, sparsifier, 6))
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.1)
    xs, ys = torch.randn(4, 10, 12), torch.randn(4, 10, 12)
    outputs, gradients = {}, {}
    for sparse in (False, True):
        clt.zero_grad(set_to_none=True)
        out = clt(xs, sparse=sparse)
        (out.yhat - ys).pow(2).mean().backward()
        outputs[sparse] = out.yhat.detach()
        gradients[sparse] = {name: p.grad.clone() for name, p in clt.named_parameters() if p.grad is not None}
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-6)
    assert gradients[True].keys() == gradients[False].keys() and "W_enc" in gradients[True]
    for name, dense in gradients[False].items():
        torch.testing.assert_close(gradients[True][name], dense, rtol=1e-5, atol=1e-7, msg=name)


def test_the_training_profile_counts_the_kernels_among_the_gathers(monkeypatch):
    """Each launch is a profiler range that bench_train.py's profile groups with the gathers."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    import bench_train

    monkeypatch.setattr(clt_module, "_gathers_in_triton", lambda weight: True)
    trainer = bench_train.Trainer(CLTConfig(2, 16, 4, "relu_topk", 4), torch.device("cpu"), 32, True, None)
    found = bench_train.profile(trainer, steps=1, rows=100)
    ops = {op["op"] for op in found["top_ops"]}
    assert {"triton_gather:forward", "triton_gather:values_gradient", "triton_gather:weight_gradient"} <= ops
    assert bench_train.op_group(SimpleNamespace(name="triton_gather:forward", cpu_parent=None)) == "gather and scatter"
