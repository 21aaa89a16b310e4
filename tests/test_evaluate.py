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
from clt_explorer.model.teacher import TeacherMLPs
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


def test_identity_surrogate_is_perfectly_faithful(setup):
    teacher, _, classifier, pixels, labels = setup
    evaluator = ReplacementEvaluator(teacher, classifier, lambda: TeacherMLPs(teacher))
    evaluator.update(pixels, labels, teacher.encode_images(pixels))
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
    evaluator.update(pixels, labels, teacher.encode_images(pixels))
    result = evaluator.result()
    patches = result["patches"][0]
    assert patches["accuracy"] == result["baseline"] and patches["flip_pct"] == 0 and patches["kl"] == 0
    assert result["cls"][0]["kl"] > 0  # replacing the CLS token does change the prediction distribution


def test_code_evaluator_contributions_and_reconstruction(setup):
    teacher, clt, _, pixels, _ = setup
    capture = teacher.capture(pixels)
    evaluator = CodeEvaluator(clt)
    evaluator.update(capture.xs[:, :20], capture.ys[:, :20])
    evaluator.update(capture.xs[:, 20:], capture.ys[:, 20:])
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
