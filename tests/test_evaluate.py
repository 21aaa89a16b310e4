import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clt_explorer import CLTConfig, CrossLayerTranscoder
from clt_explorer.assets.evaluation_runs import CachedRuns
from clt_explorer.data.synthetic import CLASSNAMES, TEMPLATES, SyntheticShapes
from clt_explorer.evaluation.evaluate import CodeEvaluator, ReplacementEvaluator, evaluate_clt
from clt_explorer.evaluation.layer_terms import run_layer_terms
from clt_explorer.evaluation.metrics import FaithfulnessAccumulator
from clt_explorer.model.teacher import TeacherMLPs
from clt_explorer.model.tokens import TOKEN_SETS
from clt_explorer.model.zeroshot import ZeroShotClassifier

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def setup(random_teacher):
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(random_teacher.n_layers, random_teacher.d_model, 2, "abs_topk", 8))
    classifier = ZeroShotClassifier.build(random_teacher, CLASSNAMES[:20], TEMPLATES)
    images = SyntheticShapes("test", n_images=40)
    pixels = random_teacher.preprocess_images([images[i][0] for i in range(40)])
    labels = torch.tensor([images.labels[i] % 20 for i in range(40)])
    return random_teacher, clt, classifier, pixels, labels


def teacher_pass(teacher, clt, pixels):
    """The teacher's pass with the residual stream leaving every block, and the CLT's codes and terms of it."""
    capture = teacher.capture(pixels, residuals_at=range(teacher.n_layers))
    codes = clt.encode_sparse(capture.xs)
    return capture, codes, [clt.decode_source(source, c) for source, c in enumerate(codes)]


def test_identity_surrogate_is_perfectly_faithful(setup):
    teacher, clt, classifier, pixels, labels = setup
    evaluator = ReplacementEvaluator(teacher, classifier, lambda: TeacherMLPs(teacher))
    evaluator.update(labels, *teacher_pass(teacher, clt, pixels))
    result = evaluator.result()
    for tokens in ("cls", "patches", "all"):
        for metrics in result[tokens]:
            assert metrics["delta_acc"] == 0 and metrics["flip_pct"] == 0 and metrics["kl"] == 0
            assert metrics["cka"] == pytest.approx(1.0, abs=1e-9) and metrics["cos"] == pytest.approx(1.0, abs=1e-9)
            assert metrics["top1_agree"] == 100 and metrics["top5_agree"] == 100
            assert metrics["spearman"] == pytest.approx(1.0)


def test_last_block_patch_replacement_gives_exactly_the_baseline(setup):
    teacher, clt, classifier, pixels, labels = setup
    last = teacher.n_layers - 1
    evaluator = ReplacementEvaluator(teacher, classifier, clt.surrogate, ["patches", "cls"], [last])
    evaluator.update(labels, *teacher_pass(teacher, clt, pixels))
    result = evaluator.result()
    patches = result["patches"][0]
    assert patches["accuracy"] == result["baseline"] and patches["flip_pct"] == 0 and patches["kl"] == 0
    assert result["cls"][0]["kl"] > 0  # replacing the CLS token does change the prediction distribution


def test_code_evaluator_contributions_and_reconstruction(setup):
    teacher, clt, _, pixels, _ = setup
    evaluator = CodeEvaluator(clt)
    for images in (slice(None, 20), slice(20, None)):
        capture, codes, terms = teacher_pass(teacher, clt, pixels[images])
        evaluator.update(capture.ys, codes, terms)
    capture = teacher.capture(pixels)
    result = evaluator.result()
    for tokens in ("cls", "patches"):
        C = torch.tensor(result["contributions"][tokens])
        assert torch.allclose(C.sum(1), torch.ones(teacher.n_layers), atol=1e-6)
        direct = clt.contributions(clt.encode(capture.xs[:, :, 0:1] if tokens == "cls" else capture.xs[:, :, 1:]))
        assert torch.allclose(C, direct, atol=1e-5)
    yhat = clt.decode(clt.encode(capture.xs)).detach()
    expected_mse = (yhat - capture.ys).pow(2).mean((1, 2, 3))
    assert torch.allclose(torch.tensor(result["reconstruction"]["all"]["mse"]).float(), expected_mse, rtol=1e-5)
    assert result["l0"] == pytest.approx([8.0] * teacher.n_layers)


@pytest.mark.parametrize("sparsifier", ["abs_topk", "jumprelu"])
def test_cascades_resumed_from_the_teacher_pass_measure_what_whole_passes_do(setup, sparsifier):
    """evaluate_clt runs each cascade s -> L-1 from block s of the teacher's pass; the reference runs every cascade
    as a whole pass from the pixels."""
    teacher, _, classifier, _, _ = setup
    torch.manual_seed(1)
    clt = CrossLayerTranscoder(CLTConfig(teacher.n_layers, teacher.d_model, 2, sparsifier, 8))
    with torch.no_grad():
        clt.W_dec[1].mul_(30.0)  # a CLT whose replacement moves the predictions
    data = SyntheticShapes("test", 24)
    data.labels = [label % 20 for label in data.labels]
    found = evaluate_clt(teacher, clt, data, classifier, batch_size=10, progress=False)["cascade"]
    expected = {(tokens, start): FaithfulnessAccumulator(len(classifier.templates))
                for tokens in TOKEN_SETS for start in range(teacher.n_layers)}
    for first in range(0, 24, 10):
        images = range(first, min(first + 10, 24))
        pixels = teacher.preprocess_images([data[i][0] for i in images])
        labels = torch.tensor([data.labels[i] for i in images])
        plain = teacher.encode_images(pixels)
        for (tokens, start), accumulator in expected.items():
            with teacher.replace_mlps(clt.surrogate(), start, tokens):
                replaced = teacher.encode_images(pixels)
            accumulator.update(labels, plain, replaced, classifier.logits(plain), classifier.logits(replaced),
                               classifier.template_logits(plain), classifier.template_logits(replaced))
    moved = 0
    for (tokens, start), accumulator in expected.items():
        reference, result = accumulator.result(), found[tokens][start]
        assert result["start"] == start
        for metric, value in reference.items():
            assert result[metric] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), (tokens, start, metric)
        moved += reference["flip_pct"] > 0
    assert moved > len(expected) // 2  # the comparison is not between unchanged predictions


def test_evaluate_clt_covers_every_start_and_token_set(random_teacher, setup):
    teacher, clt, classifier, _, _ = setup
    result = evaluate_clt(teacher, clt, SyntheticShapes("test", 24), classifier, batch_size=10, progress=False)
    assert result["n_images"] == 24 and result["cascade"]["starts"] == list(range(teacher.n_layers))
    assert set(result["reconstruction"]) == {"cls", "patches", "all"}
    json.dumps(result)  # plain data


def test_evaluation_and_layer_terms_loading_in_workers_give_the_same_results(setup):
    """Both load the held-out images in worker processes where asked (on a GPU by default), with the same results."""
    teacher, clt, classifier, _, _ = setup
    data = SyntheticShapes("test", 24)
    data.labels = [label % 20 for label in data.labels]
    results = {}
    for workers in (0, 2):
        evaluation = evaluate_clt(teacher, clt, data, classifier, batch_size=10, num_workers=workers, progress=False)
        terms = run_layer_terms(teacher, clt, data, classifier, evaluation["contributions"], batch_size=10,
                                n_draws=2, num_workers=workers, progress=False)
        results[workers] = json.dumps([evaluation, terms])  # exact, NaN (a constant ranking's Spearman) included
    assert results[2] == results[0]


def test_a_bundles_evaluation_loads_in_the_devices_workers_unless_told(random_teacher, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr("os.path.isdir", lambda path: False)  # no /dev/shm to bound them
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert CachedRuns(None, "cuda", random_teacher, 64, None).num_workers == 7
    assert CachedRuns(None, "cuda", random_teacher, 64, 2).num_workers == 2
    assert CachedRuns(None, "cpu", random_teacher, 64, None).num_workers == 0


@pytest.mark.slow
def test_reproduce_tables_on_the_tiny_bundle(tiny_bundle, tmp_path):
    out = tmp_path / "tables"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce_tables.py"), "--bundle",
                           str(tiny_bundle.root), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    paper = (ROOT / "clt_explorer" / "data" / "resources")
    header = (paper / "paper_cascade_accuracy.csv").read_text().splitlines()[0]
    assert (out / "cascade_accuracy.csv").read_text().splitlines()[0] == header
    rows = (out / "cascade_accuracy.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 * 4  # cls / patches / all x 4 start layers of the tiny CLIP
    faithfulness_header = (paper / "paper_faithfulness_vitb32_cifar100.csv").read_text().splitlines()[0]
    assert (out / "faithfulness.csv").read_text().splitlines()[0] == faithfulness_header
    for name in ("reconstruction_all.html", "contributions.html", "tables.md", "results.json", "layer_terms.json",
                 "layer_terms_retention.html", "layer_terms_removal.html", "prompt_sensitivity.html"):
        assert (out / name).stat().st_size > 0
    from clt_explorer.evaluation.layer_terms import CSV_COLUMNS

    terms = (out / "layer_terms.csv").read_text().splitlines()
    assert terms[0] == ",".join(CSV_COLUMNS) and len(terms) > 3 * 3 * (1 + 4 + 2 + 4 * 4)
    assert "top-1 removal costs" in done.stdout and "Layer terms of relu_topk" in (out / "tables.md").read_text()
    patch_last = [r.split(",") for r in rows if r.split(",")[3] == "patches" and r.split(",")[4] == "3"][0]
    assert patch_last[5] == patch_last[6] == patch_last[7] == patch_last[8]  # = the baseline, for every sparsifier


def test_the_evaluation_benchmark_times_each_sparsifier():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_evaluate.py"), "--shape", "tiny",
                           "--expansion", "2", "--k", "8", "--images", "6", "--batch-size", "3", "--sparsifiers",
                           "relu_topk,jumprelu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert [row["sparsifier"] for row in result["rows"]] == ["relu_topk", "jumprelu"]
    assert all(row["images_per_s"] > 0 for row in result["rows"]) and result["images"] == 6
