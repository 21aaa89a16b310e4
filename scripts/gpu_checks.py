"""The GPU measurements of the paper's grid as one prepared run on a lent GPU machine, whose time is short.

Steps, one after another, each in its own process with its own time limit, its output saved as it runs:

1. ``train_4096``: training throughput at true ViT-B/32 scale (``bench_train.py``: F = 12288, k = 128, bf16), the
   paper's three sparsifiers with the dense and the sparse decoder, 4,096 tokens a batch, with the profile of where a
   step's time goes (a step stopped at its limit keeps the paths it finished);
2. ``train_16384``: the same at 16,384 tokens a batch, where the products weigh more against the rest of a step;
3. ``loading``: images a second the loader prepares for the ViT-B/32 teacher by number of worker processes
   (``bench_loading.py``), against the 2,600 a second that training at 130k tokens/s reads;
4. ``rehearsal``: the ``paper`` preset end to end at the ViT-B/32 shape (``rehearse_paper.py``) at ``--scale`` (0.05:
   2,500 / 500 images, one epoch), each stage projected to the true scale; its limit is what is left of the budget.

A step that outlives its limit is stopped (its whole process group) and recorded as timed out; the next one runs. The
machine's image lacks some of the packages the pipeline needs (open_clip and what it needs, faiss, plotly): they
travel as wheels of the versions installed here, fetched here first. Each step's log and a ``summary.json`` land in
``--out`` (``$OUT`` on the lent machine), and a table is printed.

    python scripts/gpu_checks.py wheels                       # here: .whl/ (ignored by git, carried there)
    python3 scripts/gpu_checks.py run --out $OUT --wheels .whl # there: in one call that carries .whl
    python scripts/gpu_checks.py run --out /tmp/checks --tiny  # a CPU rehearsal of the run at toy sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
# Needed by the pipeline and absent from the image of the GPU machines lent to this project (as listed 2026-11-17).
MISSING_THERE = ("open_clip_torch", "ftfy", "wcwidth", "faiss-cpu", "plotly")
THEIR_PYTHON = "3.12"
THEIR_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux1_x86_64")
TINY_TRAIN = ["--layers", "2", "--d-model", "32", "--expansion", "4", "--k", "8", "--steps", "2"]
LOADING = ["--images", "2000"]  # enough for a steady rate of 15 workers, little of the rehearsal's time
TINY_LOADING = ["--images", "100", "--workers", "0,1"]
LOADING_LIMIT_S = 30


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: float | None  # None: what is left of the budget


def wheel_pins() -> list[str]:
    """``name==version`` of each package the lent machine lacks, at the version installed here (what the tests ran)."""
    return [f"{name}=={metadata.version(name)}" for name in MISSING_THERE]


def download_command(folder: Path) -> list[str]:
    """pip's command that fetches those wheels, built for the lent machine's Python and platform, without their
    dependencies (the machine has the rest)."""
    platforms = [flag for tag in THEIR_PLATFORMS for flag in ("--platform", tag)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            THEIR_PYTHON, "--implementation", "cp", *platforms, "-d", str(folder), *wheel_pins()]


def steps(args: argparse.Namespace) -> list[Step]:
    """The run's steps; ``--tiny`` shrinks every one to toy sizes (a CPU rehearsal of the run itself)."""
    python = sys.executable
    train = [python, str(SCRIPTS / "bench_train.py"), "--decoders", "dense,sparse"] + (TINY_TRAIN if args.tiny else [])
    shape = ["--shape", "tiny"] if args.tiny else []
    return [Step("train_4096", train + ["--batch-tokens", "64" if args.tiny else "4096", "--profile"],
                 args.train_limit_s),
            Step("train_16384", train + ["--batch-tokens", "256" if args.tiny else "16384", "--profile"],
                 args.train_limit_s),
            Step("loading", [python, str(SCRIPTS / "bench_loading.py"), *(TINY_LOADING if args.tiny else LOADING)],
                 LOADING_LIMIT_S),
            Step("rehearsal", [python, str(SCRIPTS / "rehearse_paper.py"), "--work", str(args.work), "--scale",
                               str(args.scale), *shape], None)]


def install_wheels(folder: Path, site: Path) -> None:
    """Install the carried wheels into ``site``, without the network or dependencies."""
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {folder}: run `python scripts/gpu_checks.py wheels` where pip works")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *wheels], check=True)


def run_step(step: Step, limit_s: float, log: Path, env: dict) -> dict:
    """Run one step with its output in ``log``; stopped with its whole process group after ``limit_s``."""
    began = time.time()
    with log.open("w") as out:
        process = subprocess.Popen(step.command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)
        try:
            status = "ok" if process.wait(timeout=max(limit_s, 1)) == 0 else f"failed ({process.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"timed out ({limit_s:.0f} s)"
    return {"status": status, "seconds": round(time.time() - began, 1), **read_log(log)}


def read_log(log: Path) -> dict:
    """What a step's log holds: ``result``, its last JSON line (each script ends with one; None if cut before), and
    ``stages``, the rehearsal's rows printed as each stage ended."""
    from rehearse_paper import STAGE_LINE

    result, stages = None, []
    for line in log.read_text(errors="replace").splitlines():
        try:
            if line.startswith("{"):
                result = json.loads(line)
            elif line.startswith(STAGE_LINE + "{"):
                stages.append(json.loads(line[len(STAGE_LINE):]))
        except json.JSONDecodeError:
            continue  # a line cut where the process was stopped
    return {"result": result, "stages": stages}


def decoding_figures(path: dict) -> str:
    """One sparsifier's decoding path of a training step in a few words."""
    label = f"{path['sparsifier']} {path['path']}"
    if "error" in path:
        return f"{label} failed"
    difference = f", {path['difference_from_dense']:.0e} from dense" if path["difference_from_dense"] else ""
    return f"{label} {path['tokens_per_s']:,.0f} tok/s ({100 * path['matmul_fraction']:.0f}%{difference})"


def headline(name: str, found: dict) -> str:
    """One step's figures in a few words."""
    result = found["result"]
    if name.startswith("train") and result is not None:
        return f"{', '.join(map(decoding_figures, result['all']))} of {result['matmul_tflops']:.3g} TFLOP/s"
    if name == "loading" and result is not None:
        return "images/s by workers: " + ", ".join(f"{row['workers']}: {row['images_per_s']:,.0f}"
                                                   for row in result["rows"])
    if result is not None:
        return (f"{result['train_images']} images, {result['epochs']} epochs: {result['total_s']:.0f} s; "
                f"~{result['projected_total_s'] / 3600:.1f} h at true scale; failed: {result['failed'] or 'none'}")
    if found["stages"]:
        return "stages done: " + ", ".join(f"{row['stage']} {row['seconds']:.0f} s" for row in found["stages"])
    return "-"


def environment() -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "gpu": gpu,
            "cpus": os.cpu_count(), "host": platform.node()}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(ROOT)]  # the package, not installed there
    if args.wheels:
        install_wheels(Path(args.wheels), Path(args.site))
        paths.insert(0, args.site)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    sys.path[:0] = paths  # this process too reads the rehearsal's module (for its logs), which imports them
    summary = {"environment": environment(), "budget_s": args.budget_s, "steps": {}}
    deadline = time.time() + args.budget_s
    machine = summary["environment"]
    print(f"{machine['gpu'] or 'no GPU'}, {machine['cpus']} CPUs, torch {machine['torch']}, Python {machine['python']}"
          f"\n{'step':12} {'status':20} {'seconds':>8}  figures", flush=True)
    for step in steps(args):
        left = deadline - time.time()
        found = run_step(step, left if step.limit_s is None else min(step.limit_s, left), out / f"{step.name}.log", env)
        summary["steps"][step.name] = found
        (out / "summary.json").write_text(json.dumps(summary, indent=1))  # kept step by step: a cut run keeps its part
        print(f"{step.name:12} {found['status']:20} {found['seconds']:8.1f}  {headline(step.name, found)}",
              flush=True)
    print(json.dumps(summary))
    return 0 if all(s["status"] == "ok" for s in summary["steps"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    wheels = verbs.add_parser("wheels", help="fetch the wheels the lent machine lacks (here, where pip works)")
    wheels.add_argument("--dest", default=str(ROOT / ".whl"))
    checks = verbs.add_parser("run", help="run the steps (on the lent machine)")
    checks.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu-checks", help="logs and summary.json")
    checks.add_argument("--wheels", help="a folder of wheels to install first (the `wheels` verb's)")
    checks.add_argument("--site", default="/tmp/site", help="where the wheels are installed")
    checks.add_argument("--budget-s", type=float, default=360, help="seconds for all steps together")
    checks.add_argument("--train-limit-s", type=float, default=150, help="seconds for each training benchmark")
    checks.add_argument("--scale", type=float, default=0.05, help="the rehearsal's --scale")
    checks.add_argument("--work", default="/tmp/clt-rehearsal", help="the rehearsal's --work folder")
    checks.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU")
    args = parser.parse_args(argv)
    if args.verb == "wheels":
        return subprocess.run(download_command(Path(args.dest))).returncode
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
