"""The training benchmark: where a training step's time goes, by op and by group, for each decoding path, and a path
that fails (out of memory, say) leaving the other's figures."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPTS = Path(__file__).parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_train  # noqa: E402
import torch  # noqa: E402
from bench_train import op_group  # noqa: E402

from clt_explorer import CLTConfig  # noqa: E402
from clt_explorer.model import clt as clt_module  # noqa: E402


def test_ops_are_grouped_by_name_and_inside_the_optimizer_by_their_place():
    step = SimpleNamespace(name="Optimizer.step#AdamW.step", cpu_parent=None)
    assert op_group(SimpleNamespace(name="aten::mul_", cpu_parent=SimpleNamespace(name="aten::_foreach_mul_",
                                                                                   cpu_parent=step))) == "optimizer"
    assert op_group(SimpleNamespace(name="aten::mul_", cpu_parent=None)) == "elementwise and other"
    assert op_group(SimpleNamespace(name="aten::addmm", cpu_parent=None)) == "matmul"
    assert op_group(SimpleNamespace(name="aten::_embedding_bag_backward", cpu_parent=None)) == "gather and scatter"
    assert op_group(SimpleNamespace(name="aten::topk", cpu_parent=None)) == "top-k"


TOY = ["--layers", "3", "--d-model", "32", "--expansion", "4", "--k", "8", "--batch-tokens", "64", "--steps", "2"]


def test_the_profile_splits_each_paths_step_into_ops_and_groups():
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_train.py"), *TOY, "--sparsifiers", "relu_topk",
                           "--profile", "--profile-steps", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(f"profile of the relu_topk {path} path" in done.stdout for path in ("sparse", "dense"))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for path in result["all"]:
        found = path["profile"]
        assert found["time_per_step_ms"] > 0 and abs(sum(found["groups"].values()) - 1) < 1e-9
        ops = {op["op"]: op for op in found["top_ops"]}
        assert "aten::topk" in ops and ops["aten::topk"]["calls"] == 3  # one selection per layer and step
        assert {"matmul", "top-k", "optimizer"} <= set(found["groups"])
        assert [op["share"] for op in found["top_ops"]] == sorted((op["share"] for op in found["top_ops"]),
                                                                  reverse=True)
    differences = {path["path"]: path["difference_from_dense"] for path in result["all"]}
    assert differences["dense"] == 0 and 0 < differences["sparse"] < 1e-5
    by_path = {path["path"]: path["profile"]["groups"] for path in result["all"]}
    assert by_path["sparse"]["gather and scatter"] > by_path["dense"].get("gather and scatter", 0)


def test_every_sparsifier_of_the_paper_is_timed_and_each_path_leaves_the_figures_so_far():
    """A JSON line follows each path, so that a run stopped at a time limit keeps what it finished; ``best`` is each
    sparsifier's fastest path; every sparse path agrees with the dense one."""
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_train.py"), *TOY], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    pairs = [(sparsifier, path) for sparsifier in ("relu_topk", "abs_topk", "jumprelu") for path in ("dense", "sparse")]
    assert [[(p["sparsifier"], p["path"]) for p in line["all"]] for line in lines] == \
        [pairs[:n] for n in range(1, 7)]
    result = lines[-1]
    assert all(0 < p["difference_from_dense"] < 1e-5 for p in result["all"] if p["path"] == "sparse")
    for sparsifier, best in result["best"].items():
        timed = [p for p in result["all"] if p["sparsifier"] == sparsifier]
        assert best["tokens_per_s"] == max(p["tokens_per_s"] for p in timed)
        assert best["path"] == max(timed, key=lambda p: p["tokens_per_s"])["path"]
    assert list(result["best"]) == ["relu_topk", "abs_topk", "jumprelu"]
    assert result["tokens_per_s"] == max(b["tokens_per_s"] for b in result["best"].values())


def test_a_jumprelu_trainer_starts_from_its_batch_as_training_does():
    """Thresholds near each feature's (1 - k/F) quantile of the batch, so that its codes are as sparse as a trained
    CLT's (from the initial threshold of 0.5, this batch's L0 would be ~ F/4)."""
    trainer = bench_train.Trainer(CLTConfig(2, 32, 8, "jumprelu", 16), torch.device("cpu"), 512, False, None)
    with torch.no_grad():
        l0 = torch.stack([c.l0().float().mean() for c in trainer.clt(trainer.xs).codes])
    assert ((l0 > 16 / 2) & (l0 < 16 * 2)).all(), l0


@pytest.mark.parametrize("option, value, message", [
    ("--decoders", "dense,csr", "--decoders takes sparse, dense, got 'dense,csr'"),
    ("--sparsifiers", "relu_topk,batch_topk", "--sparsifiers takes relu_topk, abs_topk, jumprelu, got "
                                              "'relu_topk,batch_topk'")])
def test_an_unknown_decoding_path_or_sparsifier_is_refused(option, value, message):
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_train.py"), option, value],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr


class CompilationError(Exception):
    """Like Triton's, not a RuntimeError."""


@pytest.mark.parametrize("error, message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore detail"),
     "CUDA out of memory. Tried to allocate 9.00 GiB"),
    (CompilationError("at 12:8: unsupported\nsource"), "at 12:8: unsupported")])
def test_a_path_that_fails_is_recorded_with_its_error_and_the_other_still_measured(error, message, monkeypatch,
                                                                                  capsys):
    class FailingSparse(bench_train.Trainer):
        def __init__(self, config, device, batch_tokens, sparse, autocast):
            if sparse:
                raise error
            super().__init__(config, device, batch_tokens, sparse, autocast)

    monkeypatch.setattr(bench_train, "Trainer", FailingSparse)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--layers", "2", "--d-model", "32", "--expansion", "4", "--k",
                                      "8", "--batch-tokens", "64", "--steps", "1", "--decoders", "sparse,dense",
                                      "--sparsifiers", "relu_topk"])
    assert bench_train.main() == 1
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["all"][0] == {"sparsifier": "relu_topk", "path": "sparse", "error": message}
    assert result["path"] == "dense" and result["tokens_per_s"] == result["all"][1]["tokens_per_s"] > 0
    assert result["best"] == {"relu_topk": {key: result["all"][1][key]
                                            for key in ("path", "tokens_per_s", "matmul_fraction")}}
    assert f"relu_topk  sparse     failed: {message}" in out


def test_the_check_against_the_dense_decoder_finds_a_gather_that_drops_the_codes_values(monkeypatch):
    trainer = bench_train.Trainer(CLTConfig(3, 16, 4, "relu_topk", 4), torch.device("cpu"), 32, True, None)
    assert bench_train.difference_from_dense(trainer) < 1e-5
    embedding_bag = clt_module.F.embedding_bag
    monkeypatch.setattr(clt_module.F, "embedding_bag", lambda *args, per_sample_weights, mode: embedding_bag(
        *args, per_sample_weights=per_sample_weights.detach().sign(), mode=mode))
    assert bench_train.difference_from_dense(trainer) > 0.1
