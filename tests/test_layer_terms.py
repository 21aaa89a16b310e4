"""The layer-term experiment: rankings, masks, the last-block shortcut against the cascade, and its invariants."""

import numpy as np
import pytest
import torch
from conftest import random_clt

from clt_explorer import CrossLayerTranscoder
from clt_explorer.data.synthetic import CLASSNAMES, TEMPLATES, SyntheticShapes
from clt_explorer.evaluation.evaluate import evaluate_clt
from clt_explorer.evaluation.layer_terms import (
    Run,
    TermReplacement,
    keep_sources,
    plan_runs,
    run_layer_terms,
    source_order,
    summary_lines,
)
from clt_explorer.model.tokens import TOKEN_SETS
from clt_explorer.model.zeroshot import ZeroShotClassifier

N_IMAGES = 40


@pytest.fixture(scope="module")
def setup(random_teacher):
    clt = random_clt(random_teacher, 2, "relu_topk", 8, seed=3)
    with torch.no_grad():
        clt.W_dec[1].mul_(20.0)  # one source that matters, so that removing it changes predictions
    classifier = ZeroShotClassifier.build(random_teacher, CLASSNAMES[:20], TEMPLATES)
    data = SyntheticShapes("test", n_images=N_IMAGES)
    data.labels = [label % 20 for label in data.labels]
    return random_teacher, clt, classifier, data


def experiment(setup, clt=None, start=None):
    teacher, default, classifier, data = setup
    clt = clt or default
    contributions = evaluate_clt(teacher, clt, data, classifier, batch_size=20, progress=False)["contributions"]
    return run_layer_terms(teacher, clt, data, classifier, contributions, start=start, batch_size=20, n_draws=3,
                           progress=False)


def test_rankings_are_the_argsort_of_c():
    scores = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    assert source_order(scores).tolist() == np.argsort(-scores.numpy(), kind="stable").tolist() == [1, 3, 4, 0, 2]
    assert source_order(scores, "bottom").tolist() == np.argsort(scores.numpy(), kind="stable").tolist()
    orders = {"dataset": source_order(scores), "bottom": source_order(scores, "bottom"),
              "random": torch.tensor([[4, 3, 2, 1, 0]])}
    image_order = torch.tensor([[0, 1, 2, 3, 4], [2, 0, 1, 4, 3]])
    kept = lambda run: [np.flatnonzero(row).tolist() for row in run.kept(orders, image_order).numpy()]  # noqa: E731
    assert kept(Run("retain", "dataset", 2)) == [[1, 3], [1, 3]]
    assert kept(Run("retain", "bottom", 2)) == [[0, 2], [0, 2]]
    assert kept(Run("retain", "image", 2)) == [[0, 1], [0, 2]]
    assert kept(Run("retain", "random", 1, draw=0)) == [[4], [4]]
    assert kept(Run("remove", "single", 1, 3)) == [[0, 1, 2, 4], [0, 1, 2, 4]]
    assert kept(Run("remove", "image", 1)) == [[1, 2, 3, 4], [0, 1, 3, 4]]
    assert keep_sources(5, torch.tensor([True, False, True, False, False]))[4].tolist() == [1, 0, 1, 0, 0]
    assert keep_sources(5, torch.zeros(5, dtype=torch.bool))[:4].eq(1).all()  # other targets keep every term


@pytest.mark.parametrize("tokens", TOKEN_SETS)
@pytest.mark.parametrize("start", [1, "last"])
def test_term_replacements_equal_the_whole_cascade(setup, tokens, start):
    """From the last block's shortcut, or resumed at block ``start`` of the teacher's pass, as the whole pass."""
    teacher, clt, classifier, data = setup
    L = teacher.n_layers
    start = L - 1 if start == "last" else start
    pixels = teacher.preprocess_images([data[i][0] for i in range(6)])
    capture = teacher.capture(pixels, residuals_at=[start])
    codes = clt.encode_sparse(capture.xs)
    terms = [clt.decode_source(source, c) for source, c in enumerate(codes)]
    replacement = TermReplacement(teacher, clt, capture, codes, terms, start)
    kept = torch.rand(6, L, generator=torch.Generator().manual_seed(1)) > 0.4
    with teacher.replace_mlps(clt.surrogate(term_weights=keep_sources(L, kept)), start, tokens):
        cascade = teacher.encode_images(pixels)
    assert torch.allclose(replacement(kept, tokens), cascade, atol=1e-5)
    with teacher.replace_mlps(clt.surrogate(), start, tokens):
        full = teacher.encode_images(pixels)
    assert torch.allclose(replacement(torch.ones(6, L, dtype=torch.bool), tokens), full, atol=1e-5)
    # the final layer's terms reach the embedding through the CLS token only
    assert tokens == "patches" or not torch.allclose(cascade, full, atol=1e-3)


@pytest.mark.parametrize("start", [None, 1])
def test_keeping_every_term_by_any_ranking_is_the_full_replacement(setup, start):
    result = experiment(setup, start=start)
    L = result["target"] + 1
    for tokens, r in result["tokens"].items():
        full = r["full"]
        for row in r["rows"]:
            if row["experiment"] == "retain" and row["m"] == L:  # the random rows are means over identical draws
                assert [row["accuracy"], row["flip_rate"], row["kl"]] == pytest.approx(
                    [full["accuracy"], full["flip_rate"], full["kl"]], rel=1e-12, abs=0), (tokens, row)
        dataset = next(row for row in r["rows"] if row["experiment"] == "remove" and row["ranking"] == "dataset")
        assert dataset["layer"] == r["dataset_order"][0] == int(np.argmax(r["dataset_contributions"]))
    patches = result["tokens"]["patches"]
    if start is None:  # replacing patch tokens in the last block cannot reach the CLS embedding
        assert all(row["flip_rate"] == 0 and row["kl"] == 0 for row in patches["rows"])
    assert any(row["flip_rate"] > 0 for row in result["tokens"]["cls"]["rows"] if row["ranking"] == "single")


@pytest.mark.parametrize("start", [None, 1])
def test_removing_a_term_whose_codes_are_all_zero_changes_nothing(setup, start):
    teacher, clt, classifier, data = setup
    silent = CrossLayerTranscoder(clt.config)
    silent.load_state_dict(clt.state_dict())
    with torch.no_grad():
        silent.b_enc[2].fill_(-1e4)  # relu(pre) = 0: layer 2 never fires
    result = experiment(setup, silent, start)
    for tokens, r in result["tokens"].items():
        removed = next(row for row in r["rows"] if row["ranking"] == "single" and row["layer"] == 2)
        assert (removed["accuracy"], removed["flip_rate"], removed["kl"]) == (
            r["full"]["accuracy"], r["full"]["flip_rate"], r["full"]["kl"]), tokens
        assert r["dataset_contributions"][2] == 0.0


def test_summary_and_spearman_of_a_faithful_ranking(setup):
    result = experiment(setup)
    r = result["tokens"]["cls"]
    drops = {row["layer"]: r["full"]["accuracy"] - row["accuracy"] for row in r["rows"] if row["ranking"] == "single"}
    import scipy.stats

    expected = scipy.stats.spearmanr(r["dataset_contributions"], [drops[s] for s in range(len(drops))]).statistic
    assert r["spearman_c_vs_drop"] == pytest.approx(expected, nan_ok=True)
    assert r["top1_removal_drop"]["dataset"] == drops[r["dataset_order"][0]]
    first, second = summary_lines("relu_topk", "cls", result, result["baseline"])
    assert first.startswith("relu_topk, cls tokens: top-1 removal costs")
    assert f"top-{r['retention_m']} retention keeps" in second
    assert len(plan_runs(4, 5)) == 1 + 4 + 1 + 4 * (3 + 5)
