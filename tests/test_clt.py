import json
import os
import subprocess
import sys

import pytest
import torch

from clt_explorer import CLTConfig, CrossLayerTranscoder
from clt_explorer.model import clt as clt_module
from clt_explorer.model.sparsifiers import SPARSIFIERS, SparseCodes, paired_codes
from clt_explorer.storage import AssetError


def make_clt(sparsifier="relu_topk", L=5, d=12, expansion=4, k=6, seed=0):
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(L, d, expansion, sparsifier, k))
    with torch.no_grad():
        clt.b_dec.normal_()
        clt.b_enc.normal_(0, 0.1)
        if sparsifier == "jumprelu":
            clt.sparsifier.log_threshold.fill_(-1.0)
    return clt


def reference_decode(clt, codes):
    """yhat_l = b_dec[l] + sum_{s<=l} z_s @ W_dec[s->l], one pair at a time."""
    L = clt.config.n_layers
    return torch.stack([
        clt.b_dec[l] + sum(codes[s] @ clt.W_dec[s][:, l - s, :] for s in range(l + 1)) for l in range(L)
    ])


@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
def test_dense_and_sparse_decode_agree_with_the_pairwise_formula(sparsifier):
    clt = make_clt(sparsifier)
    xs = torch.randn(5, 3, 7, 12)
    codes = clt.encode(xs)
    with torch.no_grad():
        dense, sparse = clt.decode(codes, sparse=False), clt.decode(codes, sparse=True)
        reference = reference_decode(clt, codes)
    assert dense.shape == (5, 3, 7, 12)
    assert ((dense - sparse).norm() / dense.norm()) < 1e-5
    assert ((dense - reference).norm() / reference.norm()) < 1e-5


@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
def test_a_pair_of_code_sets_decodes_in_one_gather_as_each_set_alone(sparsifier):
    """Two sets of codes of the same tokens (a replaced pass's and the teacher's) decode together, token by token, to
    what each decodes to alone; sets that cannot be paired (other tokens, another form or sparse width) decode apart."""
    clt = make_clt(sparsifier)
    with torch.no_grad():
        first, second = (clt.encode_layer(1, x) for x in torch.randn(2, 3, 7, 12))
        apart = clt.decode_source(1, first), clt.decode_source(1, second)
        together = clt.decode_source_pair(1, first, second)
        assert [tuple(t.shape) for t in together] == [(3, 7, 4, 12)] * 2
        assert all(map(torch.equal, together, apart))  # on a CPU a gather sums each bag on its own: the same bits
        other_form = (SparseCodes.from_dense(second.dense()) if first.held_sparse else
                      SparseCodes(second.values, second.indices, n_features=second.n_features))
        wider = SparseCodes(torch.cat([second.values, torch.zeros_like(second.values[..., :1])], -1),
                            torch.cat([second.indices, second.indices[..., :1]], -1), n_features=second.n_features)
        for other in (other_form, second.take_tokens(slice(1, None)), *([wider] if first.held_sparse else [])):
            assert paired_codes(first, other) is None
            for mine, theirs in zip(clt.decode_source_pair(1, first, other), (apart[0], clt.decode_source(1, other))):
                assert torch.equal(mine, theirs)


@pytest.mark.parametrize("sparsifier, atol", [("relu_topk", 1e-7), ("abs_topk", 1e-7), ("jumprelu", 1e-6)])
def test_the_sparse_decoder_trains_as_the_dense_one(sparsifier, atol):
    """A training pass through the gather of the active rows, the sparsifier's penalty in the loss, gives the dense
    matmul's output and the same gradient for every parameter (the encoder's through the codes' values, JumpReLU's
    thresholds through the inactive codes near them that its gather holds)."""
    clt = make_clt(sparsifier)
    xs, ys = torch.randn(5, 64, 12), torch.randn(5, 64, 12)
    outputs, gradients = {}, {}
    for sparse in (False, True):
        clt.zero_grad(set_to_none=True)
        out = clt(xs, sparse=sparse)
        penalty = clt.sparsifier.penalty(out.pre)
        ((out.yhat - ys).pow(2).mean() + (0 if penalty is None else penalty)).backward()
        outputs[sparse] = out.yhat.detach()
        gradients[sparse] = {name: p.grad.clone() for name, p in clt.named_parameters() if p.grad is not None}
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-6)
    assert gradients[True].keys() == gradients[False].keys() == {name for name, _ in clt.named_parameters()}
    for name, dense in gradients[False].items():
        assert torch.allclose(gradients[True][name], dense, rtol=1e-5, atol=atol), name


def test_in_training_jumprelus_codes_reach_the_gather_held_sparse_with_the_inactive_ones_near_their_threshold():
    """Held sparse for the gather, with zero codes (the inactive ones its straight-through gradient reaches); held
    dense for the matmul, and outside training (gathered by each token's nonzero codes)."""
    clt = make_clt("jumprelu")
    xs = torch.randn(5, 64, 12)
    gathered, multiplied = clt(xs, sparse=True).codes, clt(xs, sparse=False).codes
    assert all(c.held_sparse for c in gathered) and not any(c.held_sparse for c in multiplied)
    assert any((c.values == 0).any() for c in gathered)
    with torch.no_grad():
        assert not any(c.held_sparse for c in clt(xs, sparse=True).codes)


def test_the_sparse_decoder_refuses_codes_held_dense_that_need_every_gradient():
    """A gather of the nonzero entries of codes held dense would give the zero ones no gradient."""
    clt = make_clt("jumprelu")
    z = torch.randn(4, clt.config.n_features).relu().requires_grad_()
    with pytest.raises(ValueError, match="would not give the zero ones their gradient"):
        clt.decode_source(0, SparseCodes.from_dense(z), sparse=True)
    with torch.no_grad():
        torch.testing.assert_close(clt.decode_source(0, SparseCodes.from_dense(z), sparse=True),
                                   clt.decode_source(0, SparseCodes.from_dense(z), sparse=False))


def test_codes_held_dense_decode_on_a_cpu_through_their_nonzero_rows_except_in_training(monkeypatch):
    """JumpReLU's codes, held dense, decode without gradients as the gather of each token's nonzero entries (tokens
    of any L0, none included) to the matmul's result; with the straight-through gradient they keep the matmul, and
    an inactive code gets its gradient."""
    clt = make_clt("jumprelu")
    gathered = []
    gather = clt_module._gather_nonzero
    monkeypatch.setattr(clt_module, "_gather_nonzero", lambda w, z: gathered.append(z.shape) or gather(w, z))
    z = torch.randn(3, 4, clt.config.n_features)
    z[z.abs() < 1.0] = 0
    z[0, 0], z[1, 2, :] = 0, torch.randn(clt.config.n_features)  # a token without codes, one with all of them
    weight = clt.W_dec[1].reshape(clt.config.n_features, -1)
    with torch.no_grad():
        found = clt.decode_source(1, SparseCodes.from_dense(z))
    assert gathered == [z.shape]
    reference = (z.double() @ weight.double()).reshape(found.shape)
    assert torch.allclose(found.double(), reference, rtol=0, atol=1e-5) and not found[0, 0].any()
    z.requires_grad_(True)
    clt.decode_source(1, SparseCodes.from_dense(z)).sum().backward()
    assert gathered == [z.shape] and z.grad[0, 0].ne(0).all()  # the matmul: every code has its gradient


@pytest.mark.parametrize("sparsifier", ["relu_topk", "abs_topk"])
def test_codes_have_at_most_k_nonzeros(sparsifier):
    clt = make_clt(sparsifier)
    codes = clt.encode(torch.randn(5, 40, 12))
    assert codes.shape == (5, 40, 48)
    assert ((codes != 0).sum(-1) <= 6).all()
    if sparsifier == "relu_topk":
        assert (codes >= 0).all()


def test_changing_a_source_changes_no_earlier_target():
    clt = make_clt("abs_topk")
    codes = clt.encode(torch.randn(5, 9, 12))
    base = clt.decode(codes).detach()
    for s in range(5):
        changed = codes.clone()
        changed[s] += torch.randn_like(changed[s])
        out = clt.decode(changed).detach()
        assert torch.equal(out[:s], base[:s])
        assert not torch.allclose(out[s], base[s])


@pytest.mark.parametrize("sparse", [True, False])
def test_contributions_rows_sum_to_one_and_match_direct_norms(sparse):
    clt = make_clt("relu_topk")
    codes = clt.encode(torch.randn(5, 11, 12)).detach()
    with torch.no_grad():
        C = clt.contributions(codes, sparse=sparse)
    assert torch.allclose(C.sum(1), torch.ones(5), atol=1e-6)
    assert torch.equal(C.triu(1), torch.zeros(5, 5))
    direct = torch.zeros(5, 5)
    for l in range(5):
        for s in range(l + 1):
            direct[l, s] = (codes[s] @ clt.W_dec[s][:, l - s, :]).detach().norm(dim=-1).mean()
        direct[l] /= direct[l].sum()
    assert torch.allclose(C, direct, atol=1e-5)


@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
def test_save_load_round_trip_is_bit_exact(tmp_path, sparsifier):
    clt = make_clt(sparsifier)
    clt.save_pretrained(tmp_path)
    loaded = CrossLayerTranscoder.from_pretrained(tmp_path)
    assert loaded.config == clt.config
    assert clt.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in clt.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]) and tensor.dtype == loaded.state_dict()[name].dtype
    xs = torch.randn(5, 4, 12)
    assert torch.equal(clt.decode(clt.encode(xs)), loaded.decode(loaded.encode(xs)))


def test_from_pretrained_through_the_hub_cache_offline(tmp_path, monkeypatch):
    """A Hub repo id resolves through huggingface_hub's cache (HF_HUB_OFFLINE, no network)."""
    from huggingface_hub import constants

    clt = make_clt("abs_topk")
    source = tmp_path / "source"
    clt.save_pretrained(source)
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--someone--tiny-clt" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((source / name).read_bytes())
    (cache / "models--someone--tiny-clt" / "refs").mkdir()
    (cache / "models--someone--tiny-clt" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = CrossLayerTranscoder.from_pretrained("someone/tiny-clt", cache_dir=str(cache))
    for name, tensor in clt.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    with pytest.raises(AssetError, match="could not fetch 'someone/other-clt'"):
        CrossLayerTranscoder.from_pretrained("someone/other-clt", cache_dir=str(cache))


def test_not_a_folder_nor_a_repo_id_is_rejected(tmp_path):
    with pytest.raises(AssetError, match="neither a CLT folder nor a Hub repo id"):
        CrossLayerTranscoder.from_pretrained(str(tmp_path / "missing" / "deep" / "path"))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown sparsifier"):
        CLTConfig(2, 4, sparsifier="topk")
    with pytest.raises(ValueError, match="exceeds"):
        CLTConfig(2, 4, expansion=2, k=9)


def test_vit_b_scale_parameter_count():
    topk = 12 * 768 * 12288 + 12 * 12288 + 78 * 12288 * 768 + 12 * 768
    assert CLTConfig(12, 768, 16).n_parameters == topk
    assert abs(CLTConfig(12, 768, 16).n_parameters / 1e6 - 849) < 1
    assert CLTConfig(12, 768, 16, "jumprelu").n_parameters == topk + 12 * 12288  # one threshold per feature


def test_first_release_files_with_a_top_level_threshold_still_load(tmp_path):
    """Files of the first release named the JumpReLU thresholds ``log_threshold``; they now belong to the
    sparsifier (``sparsifier.log_threshold``) and old files load into it."""
    from safetensors.torch import load_file, save_file

    clt = make_clt("jumprelu")
    clt.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["log_threshold"] = tensors.pop("sparsifier.log_threshold")
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = CrossLayerTranscoder.from_pretrained(tmp_path)
    assert torch.equal(loaded.sparsifier.log_threshold, clt.sparsifier.log_threshold)
    xs = torch.randn(5, 4, 12)
    assert torch.equal(clt.encode(xs), loaded.encode(xs))


@pytest.mark.slow
def test_creating_a_vit_b_scale_clt_needs_no_more_than_its_own_size():
    """Peak resident memory of a fresh process that builds the 849M-parameter CLT (3.4 GB in fp32)."""
    code = (
        "import resource, torch, json\n"
        "from clt_explorer import CLTConfig, CrossLayerTranscoder\n"
        "torch.set_num_threads(2)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "clt = CrossLayerTranscoder(CLTConfig(12, 768, 16))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "size = sum(p.numel() * p.element_size() for p in clt.parameters())\n"
        "print(json.dumps({'grown': (after - before) * 1024, 'size': size}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["size"] == CLTConfig(12, 768, 16).n_parameters * 4
    assert figures["grown"] <= 1.05 * figures["size"], figures


def test_the_encoder_scales_each_layers_input_before_encoding():
    """pre_l = (x_l * input_scale_l) @ W_enc[l] + b_enc[l]: the per-layer scale estimated from data is applied."""
    clt = make_clt("relu_topk")
    with torch.no_grad():
        clt.input_scale.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0]))
    xs = torch.randn(5, 7, 12)
    with torch.no_grad():
        for layer in range(5):
            expected = (xs[layer] * clt.input_scale[layer]) @ clt.W_enc[layer] + clt.b_enc[layer]
            assert torch.allclose(clt.preactivations(layer, xs[layer]), expected, atol=1e-6)
            top = expected.relu().topk(6).indices
            reference = torch.zeros_like(expected).scatter(-1, top, expected.relu().gather(-1, top))
            assert torch.allclose(clt.encode(xs)[layer], reference, atol=1e-6)
