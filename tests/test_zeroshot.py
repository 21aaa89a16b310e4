import pytest
import torch

from clt_explorer.data.synthetic import CLASSNAMES, TEMPLATES
from clt_explorer.model.zeroshot import ZeroShotClassifier, top1_accuracy


def test_class_embeddings_follow_clips_recipe(random_teacher):
    classifier = ZeroShotClassifier.build(random_teacher, CLASSNAMES[:5], TEMPLATES[:2])
    with torch.no_grad():
        texts = [[t.format(c) for c in CLASSNAMES[:5]] for t in TEMPLATES[:2]]
        per_template = torch.stack([torch.nn.functional.normalize(
            random_teacher.model.encode_text(random_teacher.tokenizer(t)), dim=-1) for t in texts])
    expected = torch.nn.functional.normalize(per_template.mean(0), dim=-1)
    assert torch.allclose(classifier.weights, expected, atol=1e-6)
    image = torch.randn(3, expected.shape[1])
    logits = classifier.logits(image)
    assert torch.allclose(logits, classifier.logit_scale * torch.nn.functional.normalize(image, dim=-1) @ expected.T,
                          atol=1e-5)
    assert top1_accuracy(logits, logits.argmax(-1)) == 1.0


def test_cached_classifier_is_reused_only_for_the_same_teacher_and_names(random_teacher, tmp_path, monkeypatch):
    path = tmp_path / "zeroshot.safetensors"
    built = ZeroShotClassifier.build(random_teacher, CLASSNAMES[:4], TEMPLATES)
    built.save(path, random_teacher)
    monkeypatch.setattr(ZeroShotClassifier, "build", classmethod(lambda *a: pytest.fail("rebuilt")))
    loaded = ZeroShotClassifier.load_or_build(random_teacher, CLASSNAMES[:4], TEMPLATES, path)
    assert torch.equal(loaded.template_weights, built.template_weights)
    assert loaded.logit_scale == built.logit_scale
    monkeypatch.undo()
    other = ZeroShotClassifier.load_or_build(random_teacher, CLASSNAMES[:5], TEMPLATES, path)
    assert other.weights.shape[0] == 5  # other class names: built anew, not read from the cache


def test_logits_carry_the_teachers_own_logit_scale(random_teacher):
    """CLIP's logit scale (exp of the learned log scale, at most 100) sets the softmax temperature of every KL
    and flip metric; a randomly initialised CLIP has 1/0.07."""
    classifier = ZeroShotClassifier.build(random_teacher, CLASSNAMES[:5], TEMPLATES)
    expected = float(random_teacher.model.logit_scale.exp())
    assert classifier.logit_scale == pytest.approx(expected) and expected == pytest.approx(1 / 0.07)
    image = torch.randn(2, classifier.weights.shape[1])
    cosine = torch.nn.functional.normalize(image, dim=-1) @ classifier.weights.T
    assert torch.allclose(classifier.logits(image), expected * cosine, atol=1e-4)
