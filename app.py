"""CLT Explorer: the Gradio web app (also the Hugging Face Spaces app_file).

    python app.py                                # the offline default bundle (built on first run)
    python app.py --bundle checkpoints/NAME      # a bundle folder
    python app.py --bundle hf://owner/repo --revision COMMIT
    CLT_EXPLORER_BUNDLE=hf://owner/repo python app.py

Without --bundle (or $CLT_EXPLORER_BUNDLE) the app opens the first finished bundle under checkpoints/, or
serves the page at once and builds the offline tiny-CLIP demo bundle there in a background process (once):
analyses work as soon as its first CLT is ready, the rest follows without a restart.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from clt_explorer.app.analysis import Explorer
from clt_explorer.app.bundle_source import BackgroundBuild, OpenedBundle
from clt_explorer.app.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from clt_explorer.app.ui import CSS, THEME, UploadLimits, build_ui
from clt_explorer.assets.build_status import finished_bundles
from clt_explorer.assets.bundle import HF_PREFIX, Bundle, open_bundle, validate_name

CHECKPOINTS = Path(__file__).parent / "checkpoints"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=env("CLT_EXPLORER_BUNDLE"),
                        help="bundle folder, a bundle name under checkpoints/, or hf://owner/repo")
    parser.add_argument("--revision", default=env("CLT_EXPLORER_REVISION"), help="Hub revision (commit) to pin")
    parser.add_argument("--host", default=env("CLT_EXPLORER_HOST") or env("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 to serve the network; a Space sets "
                             "$GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int,
                        default=int(env("CLT_EXPLORER_PORT") or env("GRADIO_SERVER_PORT") or "7860"))
    parser.add_argument("--share", action="store_true", help="open a public gradio.live link")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clt-dtype", choices=["float32", "bfloat16"],
                        help="CLT weights' dtype (default: bfloat16 on a CPU for CLTs over 1 GiB, else float32)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_BYTES / 2**20)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--concurrency", type=int, default=2, help="analyses that run at once")
    parser.add_argument("--queue-size", type=int, default=64, help="requests that may wait; more are refused")
    return parser.parse_args(argv)


def resolve_bundle(spec: str, revision: str | None) -> Bundle:
    """--bundle as a folder, a name under checkpoints/ or hf://owner/repo."""
    if spec.startswith(HF_PREFIX) or Path(spec).is_dir():
        return open_bundle(spec, revision)
    return open_bundle(CHECKPOINTS / validate_name(spec, "bundle name"))


def resolve_source(args: argparse.Namespace) -> OpenedBundle | BackgroundBuild:
    """The bundle asked for; else the first finished bundle under checkpoints/; else the default bundle, built in
    the background while the page is served."""
    dtype = getattr(torch, args.clt_dtype) if args.clt_dtype else None
    if args.bundle:
        return OpenedBundle(Explorer(resolve_bundle(args.bundle, args.revision), args.device, dtype))
    found = finished_bundles(CHECKPOINTS)
    if found:
        return OpenedBundle(Explorer(Bundle.load(found[0]), args.device, dtype))
    return BackgroundBuild(CHECKPOINTS, args.device, dtype)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    source = resolve_source(args)
    limits = UploadLimits(int(args.max_upload_mb * 2**20), args.max_pixels)
    demo = build_ui(source, limits)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                max_file_size=limits.max_bytes, theme=THEME, css=CSS)


if __name__ == "__main__":
    main()
