"""The prepared GPU run: its steps run one after another with their logs kept, a step over its limit is stopped with
its whole process group while what it finished is kept, and the wheels it carries are those the tests ran here."""

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_checks  # noqa: E402


def processes_naming(text: str) -> list[str]:
    """Command lines of this machine's live processes that contain ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(command)
    return found


@pytest.mark.slow
def test_the_run_keeps_each_steps_figures_and_stops_the_one_over_the_budget(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([sys.executable, str(SCRIPTS / "gpu_checks.py"), "run", "--tiny", "--out", str(out),
                           "--work", str(work), "--scale", "0.1", "--budget-s", "50"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]  # the rehearsal at this scale needs minutes
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(done.stdout.strip().splitlines()[-1])
    steps = summary["steps"]
    assert list(steps) == ["train_4096", "train_16384", "loading", "rehearsal"]
    loading = steps["loading"]["result"]
    assert steps["loading"]["status"] == "ok" and [row["workers"] for row in loading["rows"]] == [0, 1]
    assert loading["images"] == 100 and all(row["images_per_s"] > 0 for row in loading["rows"])
    assert f"images/s by workers: 0: {loading['rows'][0]['images_per_s']:,.0f}" in done.stdout
    for name, tokens in (("train_4096", 64), ("train_16384", 256)):
        result = steps[name]["result"]
        assert steps[name]["status"] == "ok" and result["batch_tokens"] == tokens
        assert [(path["sparsifier"], path["path"]) for path in result["all"]] == [
            (sparsifier, path) for sparsifier in ("relu_topk", "abs_topk", "jumprelu") for path in ("dense", "sparse")]
        assert all(path["tokens_per_s"] > 0 for path in result["all"])
        assert all(path["profile"]["time_per_step_ms"] > 0 for path in result["all"])
        assert name in done.stdout and f"{result['all'][0]['tokens_per_s']:,.0f} tok/s" in done.stdout
    rehearsal = steps["rehearsal"]
    assert rehearsal["status"].startswith("timed out") and rehearsal["result"] is None
    assert rehearsal["stages"][0]["stage"] == "inputs (teacher, images)"
    assert all(row["status"] == "built" for row in rehearsal["stages"])
    assert "stages done: inputs (teacher, images)" in done.stdout
    assert sum(s["seconds"] for s in steps.values()) < 50 + 10
    assert (out / "rehearsal.log").stat().st_size > 0
    assert processes_naming(str(work)) == []  # the rehearsal's whole process group was stopped


def test_the_wheels_are_the_versions_tested_here_built_for_the_lent_machines_python(tmp_path):
    command = gpu_checks.download_command(tmp_path)
    pins = command[-len(gpu_checks.MISSING_THERE):]
    assert pins == [f"{name}=={metadata.version(name)}" for name in gpu_checks.MISSING_THERE]
    assert command[command.index("--python-version") + 1] == "3.12" and "--no-deps" in command
    assert command[command.index("-d") + 1] == str(tmp_path)
    assert [command[i + 1] for i, flag in enumerate(command) if flag == "--platform"] == \
        list(gpu_checks.THEIR_PLATFORMS)


def test_a_run_told_to_install_wheels_from_an_empty_folder_says_how_to_fetch_them(tmp_path):
    with pytest.raises(SystemExit, match="no wheels in .*: run `python scripts/gpu_checks.py wheels`"):
        gpu_checks.main(["run", "--out", str(tmp_path / "out"), "--wheels", str(tmp_path)])


def test_the_table_names_a_failed_decoding_path_beside_the_measured_one():
    found = {"result": {"all": [{"sparsifier": "relu_topk", "path": "dense", "tokens_per_s": 73_000.0,
                                 "matmul_fraction": 0.48, "difference_from_dense": 0.0},
                                {"sparsifier": "relu_topk", "path": "sparse", "error": "CUDA out of memory"}],
                        "matmul_tflops": 790.2},
             "stages": []}
    assert gpu_checks.headline("train_16384", found) == \
        "relu_topk dense 73,000 tok/s (48%), relu_topk sparse failed of 790 TFLOP/s"
    found["result"]["all"][1] = {"sparsifier": "relu_topk", "path": "sparse", "tokens_per_s": 140_500.0,
                                 "matmul_fraction": 0.92, "difference_from_dense": 3.1e-7}
    assert gpu_checks.headline("train_16384", found) == \
        "relu_topk dense 73,000 tok/s (48%), relu_topk sparse 140,500 tok/s (92%, 3e-07 from dense) of 790 TFLOP/s"
    assert gpu_checks.headline("rehearsal", {"result": None, "stages": []}) == "-"


def test_the_loading_benchmark_refuses_a_folder_without_class_folders_of_images(tmp_path):
    import bench_loading

    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit, match=rf"no images \(.*\) under {tmp_path}/<class>/"):
        bench_loading.main(["--folder", str(tmp_path), "--workers", "0"])
