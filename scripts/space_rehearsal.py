"""Rehearse a Hugging Face Space: run the app the way a Space runs it, on this machine.

1. copy the files a Space receives (the repository as a clone has it; not checkpoints/) into a temporary folder;
2. create a fresh virtual environment there and install ``requirements.txt`` alone (no ``pip install -e .``),
   with ``--python`` choosing the interpreter (ZeroGPU runs Python 3.10.13);
3. start ``python app.py`` as a Space does: host and port from $GRADIO_SERVER_NAME / $GRADIO_SERVER_PORT, the bundle
   from $CLT_EXPLORER_BUNDLE: ``hf://OWNER/REPO`` at a pinned $CLT_EXPLORER_REVISION, served from a Hub cache made
   offline from a local bundle (the default; what a Space downloads once), or a local bundle folder (``--local``);
4. drive one /analyze through gradio_client.

Prints a short table, then one JSON line with install_s, start_s, first_analysis_s and ok.

    python scripts/space_rehearsal.py --bundle checkpoints/synthetic-tiny-clip [--python python3.10] [--local]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app_process import free_port, fresh_copy, wait_until_up
from gradio_client import Client, handle_file

from clt_explorer.assets.bundle import Bundle

REPO_ID, REVISION = "rehearsal/clt-bundle", "0123456789abcdef0123456789abcdef01234567"


def hub_cache(bundle: Path, cache: Path) -> Path:
    """An offline Hugging Face Hub cache that holds ``bundle`` as REPO_ID at REVISION (the layout snapshot_download
    leaves behind)."""
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    shutil.copytree(bundle, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


def run(command: list[str], cwd: Path, log: Path, env: dict | None = None) -> float:
    """Run a command to completion, its output in ``log``; seconds taken (an error names the log)."""
    began = time.perf_counter()
    with open(log, "ab") as out:
        done = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="a finished bundle folder")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the Space's environment")
    parser.add_argument("--local", action="store_true", help="point $CLT_EXPLORER_BUNDLE at the folder itself")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    bundle = Bundle.load(args.bundle)
    work = Path(tempfile.mkdtemp(prefix="clt-space-"))
    space, log = work / "space", work / "rehearsal.log"
    space.mkdir()
    fresh_copy(space)
    figures = {"install_s": None, "start_s": None, "first_analysis_s": None, "ok": False}
    app = None
    try:
        venv = work / "venv"
        figures["install_s"] = run([args.python, "-m", "venv", str(venv)], work, log) + run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "-r", "requirements.txt"], space, log)
        port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith(("CLT_EXPLORER_", "PYTHON"))}
        env.update(GRADIO_SERVER_NAME="0.0.0.0", GRADIO_SERVER_PORT=str(port), SYSTEM="spaces")
        if args.local:
            env["CLT_EXPLORER_BUNDLE"] = str(Path(args.bundle).resolve())
        else:
            env.update(CLT_EXPLORER_BUNDLE=f"hf://{REPO_ID}", CLT_EXPLORER_REVISION=REVISION, HF_HUB_OFFLINE="1",
                       HF_HUB_CACHE=str(hub_cache(Path(args.bundle), work / "hub")))
        began = time.perf_counter()
        with open(log, "ab") as out:
            app = subprocess.Popen([str(venv / "bin" / "python"), "app.py"], cwd=space, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        wait_until_up(url, app, timeout=900)
        figures["start_s"] = time.perf_counter() - began
        client = Client(url, verbose=False, download_files=False)
        outputs = client.predict(handle_file(str(bundle.examples()[0])), bundle.clt_names[0], "cls", 0,
                                 bundle.clt_config(bundle.clt_names[0]).n_layers - 1, 3, "cls",
                                 list(range(bundle.clt_config(bundle.clt_names[0]).n_layers)), api_name="/analyze")
        figures["first_analysis_s"] = time.perf_counter() - began
        figures["ok"] = outputs[1]["label"] in bundle.classnames
    finally:
        if app is not None:
            app.terminate()
            app.wait(timeout=60)
        keep = args.keep or not figures["ok"]  # a failed rehearsal keeps its folder and log
        print(f"rehearsal in {work} ({'kept' if keep else 'removed'}); log: {log}")
        print(f"{'install s':>10} {'start s':>8} {'first analysis s':>17} {'ok':>4}")
        print(" ".join(f"{value:>{width}.1f}" if isinstance(value, float) else f"{str(value):>{width}}"
                       for value, width in zip(figures.values(), (10, 8, 17, 4))))
        print(json.dumps(figures))
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
