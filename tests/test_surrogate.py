"""The one seam where codes are edited: term weights, feature scales and the error term of the CLT surrogate."""

import pytest
import torch
from conftest import Recorder, random_clt, random_pixels

from clt_explorer.model.tokens import TOKEN_SETS, token_index


@pytest.fixture(scope="module")
def clt(random_teacher):
    return random_clt(random_teacher, 2, "abs_topk", 8, seed=2)


def embed(teacher, surrogate, start, tokens, pixels):
    with teacher.replace_mlps(surrogate, start, tokens):
        return teacher.encode_images(pixels)


def recorded(teacher, surrogate, start, tokens, pixels):
    """The surrogate's output at every block of one replaced pass."""
    recorder = Recorder(surrogate)
    with teacher.replace_mlps(recorder, start, tokens):
        teacher.encode_images(pixels)
    return recorder.outputs


@pytest.mark.parametrize("tokens", TOKEN_SETS)
@pytest.mark.parametrize("start", [0, 2])
def test_edits_that_change_nothing_give_the_unedited_replacement_bit_for_bit(random_teacher, clt, tokens, start):
    pixels = random_pixels(random_teacher)
    L, F = clt.config.n_layers, clt.config.n_features
    plain = embed(random_teacher, clt.surrogate(), start, tokens, pixels)
    ones = embed(random_teacher, clt.surrogate(term_weights=torch.ones(L, L)), start, tokens, pixels)
    unit_scales = {(layer, f): 1.0 for layer in range(L) for f in range(0, F, 7)}
    scaled = embed(random_teacher, clt.surrogate(feature_scales=unit_scales), start, tokens, pixels)
    assert torch.equal(plain, ones) and torch.equal(plain, scaled)
    upper = torch.ones(L, L) + torch.triu(torch.full((L, L), 5.0), 1)  # entries above the diagonal are ignored
    assert torch.equal(plain, embed(random_teacher, clt.surrogate(term_weights=upper), start, tokens, pixels))


@pytest.mark.parametrize("tokens", TOKEN_SETS)
@pytest.mark.parametrize("start", [0, 3])
def test_the_error_term_without_an_edit_is_the_teacher_exactly(random_teacher, clt, tokens, start):
    pixels = random_pixels(random_teacher)
    baseline = random_teacher.encode_images(pixels)
    assert torch.equal(baseline, embed(random_teacher, clt.surrogate(error_term=True), start, tokens, pixels))
    if not (tokens == "patches" and start == random_teacher.n_layers - 1):  # the CLS embedding would not see it
        assert not torch.allclose(baseline, embed(random_teacher, clt.surrogate(), start, tokens, pixels))


def test_the_error_term_adds_the_edit_to_the_teachers_own_output(random_teacher, clt):
    """At the last block, scaling feature f by a adds (a - 1) z_f W_dec[L-1 -> L-1][f] to the teacher's output."""
    pixels = random_pixels(random_teacher)
    last = clt.config.n_layers - 1
    capture = random_teacher.capture(pixels)
    z = clt.encode_layer(last, capture.xs[last][:, 0:1]).dense()  # CLS codes of the teacher's own pass
    feature = int(z[0, 0].abs().argmax())
    outputs = recorded(random_teacher, clt.surrogate(feature_scales={(last, feature): 3.0}, error_term=True),
                       last, "cls", pixels)
    expected = capture.ys[last][:, 0:1] + 2.0 * z[..., feature, None] * clt.W_dec[last][feature, 0].detach()
    assert torch.allclose(outputs[last], expected, atol=1e-5)
    assert not torch.allclose(outputs[last], capture.ys[last][:, 0:1], atol=1e-4)


@pytest.mark.parametrize("source", [1, 2])
def test_an_edit_at_source_s_changes_no_target_below_s(random_teacher, clt, source):
    pixels = random_pixels(random_teacher)
    L, F = clt.config.n_layers, clt.config.n_features
    plain = recorded(random_teacher, clt.surrogate(), 0, "all", pixels)
    scales = recorded(random_teacher, clt.surrogate(feature_scales={(source, f): -4.0 for f in range(F)}),
                      0, "all", pixels)
    weights = torch.ones(L, L)
    weights[:, source] = 0.0
    masked = recorded(random_teacher, clt.surrogate(term_weights=weights), 0, "all", pixels)
    for edited in (scales, masked):
        assert all(torch.equal(edited[layer], plain[layer]) for layer in range(source))
        assert not torch.allclose(edited[source], plain[source])


def test_term_weights_per_image_equal_each_image_run_alone(random_teacher, clt):
    pixels = random_pixels(random_teacher, n=3)
    L = clt.config.n_layers
    weights = torch.ones(3, L, L)
    weights[0, L - 1, 0] = 0.0
    weights[2, L - 1, L - 1] = 0.0
    together = embed(random_teacher, clt.surrogate(term_weights=weights), 1, "cls", pixels)
    for b in range(3):
        alone = embed(random_teacher, clt.surrogate(term_weights=weights[b]), 1, "cls", pixels[b:b + 1])
        assert torch.allclose(together[b:b + 1], alone, atol=1e-5)


def test_removing_a_term_is_the_formula_with_that_term_left_out(random_teacher, clt):
    """yhat_l = b_dec[l] + sum_s W[l, s] u_{s->l}, with u from the codes of the modified pass."""
    pixels = random_pixels(random_teacher)
    L = clt.config.n_layers
    weights = torch.ones(L, L)
    weights[L - 1, 1] = 0.0
    weights[L - 1, 2] = 0.5
    recorder = Recorder(clt.surrogate(term_weights=weights))
    with random_teacher.replace_mlps(recorder, 0, "all"):
        random_teacher.encode_images(pixels)
    xs = torch.stack(recorder.inputs)
    with torch.no_grad():
        codes = clt.encode(xs)
        terms = [codes[s] @ clt.W_dec[s][:, L - 1 - s, :] for s in range(L)]
    expected = clt.b_dec[L - 1] + sum(weights[L - 1, s] * terms[s] for s in range(L))
    assert torch.allclose(recorder.outputs[L - 1], expected.detach(), atol=1e-5)


def test_bad_edits_are_refused_with_a_message(clt):
    L, F = clt.config.n_layers, clt.config.n_features
    with pytest.raises(ValueError, match=rf"term_weights must have shape \[{L}, {L}\]"):
        clt.surrogate(term_weights=torch.ones(L, L + 1))
    with pytest.raises(ValueError, match=f"feature {L}:0 does not exist"):
        clt.surrogate(feature_scales={(L, 0): 0.0})
    with pytest.raises(ValueError, match=f"feature 0:{F} does not exist"):
        clt.surrogate(feature_scales={(0, F): 0.0})
    with pytest.raises(ValueError, match="must be finite"):
        clt.surrogate(feature_scales={(0, 0): float("nan")})


def test_token_index_covers_each_token_set():
    assert token_index("cls") == slice(0, 1) and token_index("patches") == slice(1, None)
    assert token_index("all") == slice(None)


@pytest.mark.parametrize("tokens", TOKEN_SETS)
@pytest.mark.parametrize("start", [0, 2, 3])
@pytest.mark.parametrize("edit", ["none", "terms", "scales below", "error term"])
def test_a_pass_resumed_at_the_first_replaced_block_equals_the_whole_pass(random_teacher, clt, tokens, start, edit):
    """Resuming after block ``start`` from the teacher's residual, output, codes and terms up to there gives the whole
    replaced pass."""
    pixels = random_pixels(random_teacher, n=2)
    L = clt.config.n_layers
    weights = torch.ones(L, L)
    weights[L - 1, 0] = 0.0
    options = {"none": {}, "terms": {"term_weights": weights}, "scales below": {"feature_scales": {(0, 3): -2.0}},
               "error term": {"error_term": True, "feature_scales": {(0, 5): 3.0, (L - 1, 1): 0.0}}}[edit]
    whole = clt.surrogate(**options)
    with random_teacher.replace_mlps(whole, start, tokens):
        expected = random_teacher.encode_with_final(pixels)
    capture = random_teacher.capture(pixels, residuals_at=[start])
    codes = clt.encode_sparse(capture.xs)
    resumed = clt.surrogate(**options)
    below = capture.below(start, codes, [clt.decode_source(s, c) for s, c in enumerate(codes)])
    assert len(below.codes) == start + 1 and torch.equal(below.y, capture.ys[start])
    found = random_teacher.encode_resumed(resumed, below, tokens)
    for a, b in zip(expected, found):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
    assert len(resumed.codes) == L
    for a, b in zip(whole.codes, resumed.codes):  # encoded from all tokens or from the replaced ones: rounding only
        assert torch.allclose(a.dense(), b.dense(), atol=1e-6, rtol=1e-6)
    residual = random_teacher.embed(pixels)
    for block in random_teacher.blocks[:start + 1]:
        residual = block(residual)
    assert torch.allclose(capture.residuals[start], residual, atol=1e-6) and list(capture.residuals) == [start]
    with pytest.raises(ValueError, match=f"no residual stream leaving block {start + 1}"):
        capture.below(start + 1, codes, below.terms)


@pytest.mark.parametrize("tokens", TOKEN_SETS)
@pytest.mark.parametrize("start", [0, 2])
def test_teacher_inputs_encoded_alongside_change_nothing_and_get_their_own_codes(random_teacher, clt, tokens, start):
    """The teacher's x_l, encoded in the replaced pass's products as extra tokens, get the codes they get alone, and
    the pass's own outputs and codes stay the same."""
    pixels = random_pixels(random_teacher, n=2)
    xs = random_teacher.capture(pixels).xs
    plain, alongside = clt.surrogate(feature_scales={(1, 2): 0.5}), clt.surrogate(feature_scales={(1, 2): 0.5},
                                                                               teacher_xs=xs)
    expected, found = (recorded(random_teacher, s, start, tokens, pixels) for s in (plain, alongside))
    for a, b in zip(expected, found, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(plain.codes, alongside.codes, strict=True):
        assert torch.allclose(a.dense(), b.dense(), atol=1e-6, rtol=1e-6)
    assert sorted(alongside.teacher_codes) == list(range(clt.config.n_layers)) and plain.teacher_codes == {}
    for layer, codes in alongside.teacher_codes.items():  # unedited, all tokens
        assert torch.allclose(codes.dense(), clt.encode_layer(layer, xs[layer]).dense(), atol=1e-6, rtol=1e-6)
