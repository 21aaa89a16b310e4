"""Runs scripts/train_all.py with the kill switch of train_worker.py ($KILL_AT) installed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))

import train_all  # noqa: E402
from train_worker import install_kill_switch  # noqa: E402

if __name__ == "__main__":
    install_kill_switch()
    sys.exit(train_all.main(sys.argv[1:]))
