"""One analysis's model pass: decoded once and resumed at the first replaced block, it equals each of its parts
computed on its own the plain way (a whole replaced pass, a decode, the contributions of each token group)."""

import numpy as np
import pytest
import torch
from PIL import Image

from clt_explorer.app import analysis, features
from clt_explorer.app.analysis import compare
from clt_explorer.model.tokens import TOKEN_SETS, token_index


@pytest.mark.parametrize("clt,tokens,start,kept", [("relu_topk", "all", 0, None), ("jumprelu", "cls", 2, [0, 3]),
                                                   ("abs_topk", "patches", 3, None), ("relu_topk", "cls", 1, [1])])
def test_the_model_pass_equals_its_parts_computed_on_their_own(explorer, clt, tokens, start, kept):
    image = Image.open(explorer.examples()[1]).convert("RGB")
    found = explorer.model_pass(image, clt, tokens, start, kept)
    model, pixels = explorer.clt(clt), explorer.pixels(image)
    with torch.no_grad():
        capture = explorer.teacher.capture(pixels)
        codes = model.encode_sparse(capture.xs)
        yhat = model.decode(codes).float()
        contributions = {group: model.contributions([c.take_tokens(token_index(group)) for c in codes]).tolist()
                         for group in TOKEN_SETS}
    assert torch.allclose(found.yhat, yhat, atol=1e-5) and torch.equal(found.ys, capture.ys.float())
    for mine, theirs in zip(found.codes, codes, strict=True):  # encoded beside the replaced pass's tokens above start
        assert torch.allclose(mine.dense(), theirs.dense(), atol=1e-6)
    for group in TOKEN_SETS:
        assert np.allclose(found.contributions[group], contributions[group], atol=1e-6)
    replaced = explorer.replaced_pass(pixels, clt, tokens, start, explorer.kept_or_all(kept)).logits
    expected = compare(explorer.classifier.logits(capture.embeddings), replaced, explorer.classifier.classnames)
    for mine, theirs in ((found.predictions.teacher, expected.teacher), (found.predictions.surrogate,
                                                                          expected.surrogate)):
        assert [p.classname for p in mine] == [p.classname for p in theirs]
        assert np.allclose([p.probability for p in mine], [p.probability for p in theirs], atol=1e-5)
    assert found.predictions.flip == expected.flip and abs(found.predictions.kl - expected.kl) < 1e-5
    predicted = explorer.predict(image, clt, tokens, start, kept)
    assert [p.classname for p in predicted.surrogate] == [p.classname for p in expected.surrogate]
    assert abs(predicted.kl - expected.kl) < 1e-5
    assert not explorer.teacher.has_text_tower  # freed once the classifier was loaded


def test_one_images_passes_are_kept_for_its_ranking_cards_and_interventions(explorer, monkeypatch):
    """The teacher's pass and the unedited replaced pass of the latest images are computed once: an analysis, the
    feature ranking, a card and an intervention of the same image, CLT, tokens, start and kept sources share them."""
    calls = []
    teacher_pass = explorer.teacher_pass
    monkeypatch.setattr(explorer, "teacher_pass", lambda *args: calls.append(args[1:]) or teacher_pass(*args))
    monkeypatch.setattr(explorer, "_passes", type(explorer._passes)())
    image = Image.open(explorer.examples()[2]).convert("RGB")
    explorer.model_pass(image, "relu_topk", "cls", 1)
    features.image_features(explorer, image, "relu_topk", "cls", 1)
    features.feature_card(explorer, "relu_topk", 2, 5, image, "cls", 1)
    features.intervene(explorer, image, "relu_topk", {(2, 5): 0.0}, "cls", 1)
    assert calls == [("relu_topk", 1)]
    explorer.model_pass(image, "relu_topk", "cls", 2)  # another start: passes of their own
    explorer.model_pass(image, "relu_topk", "all", 1)
    assert len(calls) == 3
    for i in range(analysis.PASSES_KEPT):  # other images push the first out
        explorer.model_pass(Image.open(explorer.examples()[3 + i % 2]).convert("RGB"), "relu_topk", "cls", i % 3)
    explorer.model_pass(image, "relu_topk", "cls", 1)
    assert len(calls) == 4 + analysis.PASSES_KEPT and len(explorer._passes) == analysis.PASSES_KEPT


def test_a_kept_pass_holds_no_decoded_terms_and_gives_the_same_model_pass_again(explorer, monkeypatch):
    """The teacher's terms decoded in the replaced pass are summed by the model pass that computed them and not kept
    with the pass (11 MB a pass at true size): the same image again decodes them again, to the same numbers."""
    monkeypatch.setattr(explorer, "_passes", type(explorer._passes)())
    image = Image.open(explorer.examples()[1]).convert("RGB")
    first = explorer.model_pass(image, "relu_topk", "all", 1)
    (kept,) = explorer._passes.values()
    assert kept[3].teacher_codes and not kept[3].teacher_terms
    again = explorer.model_pass(image, "relu_topk", "all", 1)
    assert torch.equal(first.yhat, again.yhat) and first.contributions == again.contributions


@pytest.mark.parametrize("tokens,start", [("all", 0), ("cls", 2), ("all", 1)])
def test_the_first_replaced_blocks_tokens_are_encoded_once_and_both_sets_decoded_in_one_gather_where_all_are_replaced(
        explorer, monkeypatch, tokens, start):
    """Up to the first replaced block's MLP the replaced pass's tokens are the teacher's: encoded and decoded once
    there, in the teacher's pass, and encoded beside the teacher's above it. Where every token is replaced, both sets'
    codes are decoded there in one gather, token by token [B, T, 2, k]."""
    model = explorer.clt("relu_topk")
    encoded, encode = [], model.encode_layer
    decoded, decode = [], model.decode_source
    monkeypatch.setattr(model, "encode_layer", lambda layer, x: encoded.append((layer, x.shape[-2])) or
                        encode(layer, x))
    monkeypatch.setattr(model, "decode_source", lambda layer, codes, *args: decoded.append(
        (layer, tuple(codes.indices.shape[1:-1]))) or decode(layer, codes, *args))
    monkeypatch.setattr(explorer, "_passes", type(explorer._passes)())
    explorer.model_pass(Image.open(explorer.examples()[0]).convert("RGB"), "relu_topk", tokens, start)
    n, replaced = explorer.teacher.n_tokens, (explorer.teacher.n_tokens if tokens == "all" else 1)
    assert encoded == [(layer, n) for layer in range(start + 1)] + [(layer, n + replaced)
                                                                     for layer in range(start + 1, explorer.n_layers)]
    def above(layer):  # all tokens: both sets in one gather; else this pass's token and the teacher's apart
        return [(layer, (n, 2))] if tokens == "all" else [(layer, (1,)), (layer, (n,))]

    expected = [(layer, (n,)) for layer in range(start + 1)] + [
        shape for layer in range(start + 1, explorer.n_layers) for shape in above(layer)]
    assert sorted(decoded) == sorted(expected)


def test_passes_asked_for_without_the_teachers_terms_decode_only_what_the_replacement_needs(explorer, monkeypatch):
    """The Features tab's passes (no ``decode_teacher``) decode the replaced pass's own codes alone above the first
    replaced block; up to it, the teacher's pass decodes them (both sets' terms there), and the replaced pass
    decodes none of the teacher's."""
    model = explorer.clt("relu_topk")
    decoded, decode = [], model.decode_source
    monkeypatch.setattr(model, "decode_source", lambda layer, codes, *args: decoded.append(
        (layer, tuple(codes.indices.shape[1:-1]))) or decode(layer, codes, *args))
    monkeypatch.setattr(explorer, "_passes", type(explorer._passes)())
    pixels = explorer.pixels(Image.open(explorer.examples()[0]).convert("RGB"))
    *_, replaced = explorer.both_passes(pixels, "relu_topk", "all", 1, explorer.kept_or_all(None))
    assert decoded == [(layer, (explorer.teacher.n_tokens,)) for layer in range(explorer.n_layers)]
    assert replaced.teacher_terms == {}
