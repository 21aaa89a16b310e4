"""Load test: N concurrent gradio_client users send M full analyses each to a local app.

Starts ``python app.py --bundle BUNDLE`` on a free port (its queue settings as given), then every user
uploads the bundle's example images in turn to ``/analyze``. Prints a table, then one JSON line with
requests_per_s, p50_s, p95_s, errors and peak_rss_gb (the server's VmHWM).

    python scripts/load_test.py [--bundle DIR] [--users 8] [--requests 10] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from app_process import ROOT, free_port, peak_rss_gb, wait_until_up
from gradio_client import Client, handle_file

from clt_explorer.assets.bundle import Bundle
from clt_explorer.assets.default_bundle import default_bundle


def user(url: str, images: list[Path], clt: str, n_layers: int, requests: int, offset: int, latencies: list,
         errors: list) -> None:
    """One user: ``requests`` full analyses, one after the other, cycling over images and start layers."""
    client = Client(url, verbose=False, download_files=False)  # the server's work, not this machine's downloads
    for i in range(requests):
        image = images[(offset + i) % len(images)]
        began = time.perf_counter()
        try:
            client.predict(handle_file(str(image)), clt, "all", (offset + i) % n_layers, n_layers - 1, 3, "cls",
                           api_name="/analyze")
            latencies.append(time.perf_counter() - began)
        except Exception as error:  # every failure counts, whatever its kind
            errors.append(f"{type(error).__name__}: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="default: the app's default bundle under checkpoints/ (built if absent)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10, help="requests per user")
    parser.add_argument("--concurrency", type=int, default=2, help="the app's --concurrency")
    parser.add_argument("--queue-size", type=int, default=64, help="the app's --queue-size")
    args = parser.parse_args()
    bundle = Bundle.load(args.bundle) if args.bundle else default_bundle(ROOT / "checkpoints")
    images = bundle.examples()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--bundle", str(bundle.root), "--port", str(port),
                               "--concurrency", str(args.concurrency), "--queue-size", str(args.queue_size)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(url, server)
        latencies, errors = [], []
        clt = bundle.clt_names[0]
        n_layers = bundle.clt_config(clt).n_layers
        threads = [threading.Thread(target=user, args=(url, images, clt, n_layers, args.requests, n, latencies, errors))
                   for n in range(args.users)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        rss = peak_rss_gb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    total = args.users * args.requests
    p50, p95 = (float(np.percentile(latencies, q)) for q in (50, 95)) if latencies else (float("nan"),) * 2
    print(f"{args.users} users x {args.requests} analyses on {bundle.name}, app concurrency {args.concurrency}, "
          f"queue {args.queue_size}")
    print(f"{'requests':>9} {'errors':>7} {'seconds':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'peak RSS GB':>12}")
    print(f"{total:9d} {len(errors):7d} {elapsed:8.1f} {len(latencies) / elapsed:7.2f} {p50:7.3f} {p95:7.3f} "
          f"{rss:12.2f}")
    for error in errors[:5]:
        print("error:", error)
    print(json.dumps({"requests_per_s": len(latencies) / elapsed, "p50_s": p50, "p95_s": p95, "errors": len(errors),
                      "peak_rss_gb": rss, "users": args.users, "requests_per_user": args.requests,
                      "concurrency": args.concurrency}))


if __name__ == "__main__":
    main()
