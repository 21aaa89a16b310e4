import copy
import json

import numpy as np
import pytest

from clt_explorer.evaluation.figures import contribution_heatmap, validated_contribution_heatmap
from clt_explorer.evaluation.tables import (
    FAITHFULNESS_COLUMNS,
    cascade_columns,
    cascade_markdown,
    cascade_rows,
    faithfulness_rows,
    paper_comparison,
    paper_rows,
)


def fake_results(n_layers=12, dataset="cifar100", backbone="ViT-B-32", sparsifier="relu_topk"):
    metrics = {"accuracy": 61.0, "teacher_accuracy": 61.65, "delta_acc": -0.65, "flip_pct": 10.0, "kl": 0.03,
               "top1_agree": 90.0, "top5_agree": 88.0, "cos": 0.98, "cka": 0.95, "spearman": 0.93, "prompt_r": 0.99,
               "prompt_kl": 0.03}
    cascade = {tokens: [{"start": s, **metrics} for s in range(n_layers)] for tokens in ("cls", "patches", "all")}
    cascade.update(baseline=61.65, starts=list(range(n_layers)))
    return {"dataset": dataset, "backbone": backbone, "sparsifier": sparsifier, "l0": [128.0] * n_layers,
            "cascade": cascade}


def test_tables_have_the_paper_columns_and_numbers():
    result = fake_results()
    results = {"relu_topk": result, "abs_topk": {**copy.deepcopy(result), "sparsifier": "abs_topk"}}
    rows = cascade_rows(results)
    assert list(rows[0]) == cascade_columns(results) == list(paper_rows("cascade_accuracy")[0])
    assert rows[0]["table"] == "6" and rows[0]["dataset"] == "CIFAR-100" and rows[0]["backbone"] == "ViT-B/32"
    assert rows[0]["jumprelu"] == "" and rows[0]["relu_topk"] == "61.00"
    faithfulness = faithfulness_rows(result)
    assert list(faithfulness[0]) == FAITHFULNESS_COLUMNS == list(paper_rows("faithfulness_vitb32_cifar100")[0])
    assert faithfulness[0]["layers"] == "0-11" and faithfulness[11]["layers"] == "11"
    assert faithfulness[0]["delta_acc"] == "-0.65"


def test_paper_comparison_lines_up_matching_rows():
    comparison = paper_comparison({"relu_topk": fake_results()})
    first = [r for r in comparison if r["tokens"] == "cls" and r["start_layer"] == "0"][0]
    assert first["paper"] == "61.74" and first["ours"] == "61.00" and first["difference"] == "-0.74"
    assert len(comparison) == 36  # 3 token sets x 12 starts, one sparsifier
    assert paper_comparison({"relu_topk": fake_results(4, "synthetic", "tiny-clip")}) == []


def test_clts_are_keyed_by_name_not_by_sparsifier():
    """Two relu_topk CLTs with different names get a column each and are both compared with the paper's RTK."""
    other = fake_results()
    other["cascade"]["cls"][0]["accuracy"] = 55.0
    results = {"relu_topk": fake_results(), "rtk_k64": other}
    columns = cascade_columns(results)
    assert columns[-2:] == ["rtk_k64", "baseline"] and "relu_topk" in columns
    first = cascade_rows(results)[0]
    assert first["relu_topk"] == "61.00" and first["rtk_k64"] == "55.00"
    assert "| Range | RTK | rtk_k64 |" in cascade_markdown(results)
    compared = [r for r in paper_comparison(results) if r["tokens"] == "cls" and r["start_layer"] == "0"]
    assert {(r["clt"], r["sparsifier"], r["ours"], r["paper"]) for r in compared} == {
        ("relu_topk", "relu_topk", "61.00", "61.74"), ("rtk_k64", "relu_topk", "55.00", "61.74")}


def test_without_a_browser_the_images_are_skipped_with_a_message(tmp_path, monkeypatch):
    import plotly.graph_objects as go
    import pytest

    from clt_explorer.evaluation import report

    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setattr(report.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="needs a Chromium-based browser and none was found.*apt-get install chromium"):
        assert report.write_images({"f": go.Figure(go.Scatter(x=[0, 1], y=[1, 2]))}, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n_layers", [4, 12])
def test_the_apps_heatmap_is_the_validated_figure_with_its_numbers(n_layers):
    """The heatmap filled into a skeleton serialises as plotly's validated figure does, for each matrix and title."""
    for seed, title in ((0, "This image (cls)"), (1, "Dataset (patches)")):
        matrix = np.random.default_rng(seed).random((n_layers, n_layers)).tolist()
        fast, validated = contribution_heatmap(matrix, title), validated_contribution_heatmap(matrix, title)
        assert json.loads(fast.to_json()) == json.loads(validated.to_json())
        assert fast.data[0].z[n_layers - 1][0] == matrix[n_layers - 1][0] and fast.data[0].z[0][1] is None
