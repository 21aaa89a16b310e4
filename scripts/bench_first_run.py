"""A new user's first start: in a fresh copy of the repository (no checkpoints/), start ``python app.py`` on a free
port and time

- page_s: the first HTTP 200 of the page;
- first_analysis_s: the first successful /analyze through gradio_client (tried every 2 s with a generated image);
- complete_s: the whole default bundle on disk (its build reports that it finished without a failure).

All three count from the start of ``python app.py``. Prints a table, then one JSON line.

    python scripts/bench_first_run.py [--keep DIR] [--timeout 1800]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app_process import free_port, fresh_copy, page_up
from gradio_client import Client, handle_file

from clt_explorer.assets.build_status import read_status
from clt_explorer.assets.bundle import build_status_file
from clt_explorer.data.synthetic import SyntheticShapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="copy the built default bundle here afterwards")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clt-first-run-"))
    fresh_copy(work)
    image = work / "query.png"
    SyntheticShapes("test", 10)[3][0].save(image)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = open(work / "app.log", "wb")
    began = time.perf_counter()
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=work, stdout=log,
                           stderr=subprocess.STDOUT)
    times: dict[str, float | None] = {"page_s": None, "first_analysis_s": None, "complete_s": None}
    client, errors = None, []
    try:
        while time.perf_counter() - began < args.timeout and None in times.values():
            if app.poll() is not None:
                raise RuntimeError(f"the app exited with {app.returncode}; see {work / 'app.log'}")
            now = time.perf_counter() - began
            if times["page_s"] is None and page_up(url):
                times["page_s"] = now
                client = Client(url, verbose=False, download_files=False)
            if client is not None and times["first_analysis_s"] is None:
                try:
                    client.predict(handle_file(str(image)), "relu_topk", "cls", 0, 3, 3, "cls", [0, 1, 2, 3],
                                   api_name="/analyze")
                    times["first_analysis_s"] = time.perf_counter() - began
                except Exception as error:  # not ready yet: the app says so; try again
                    errors.append(str(error)[:200])
            roots = [p for p in (work / "checkpoints").glob("*") if p.is_dir()]
            status = read_status(build_status_file(roots[0])) if roots else None
            if times["complete_s"] is None and status and status["finished"]:
                if status["failed"]:
                    raise RuntimeError(f"the default bundle's build failed: {status['failed']}")
                times["complete_s"] = now
            time.sleep(2)
    finally:
        app.terminate()
        app.wait(timeout=60)
        log.close()
    if args.keep and times["complete_s"] is not None:
        shutil.copytree(roots[0], Path(args.keep) / roots[0].name, dirs_exist_ok=True)
    print(f"fresh copy of the repository in {work}; python app.py on port {port}")
    print(f"{'page s':>8} {'first analysis s':>17} {'complete s':>11}")
    print(" ".join(f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"
                   for value, width in zip(times.values(), (8, 17, 11))))
    if errors:
        print(f"{len(errors)} tries before the first analysis; the last answer: {errors[-1]}")
    print(json.dumps(times))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
