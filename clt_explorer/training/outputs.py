"""The files a training run leaves in its folder, beside the CLT's own ``config.json`` and ``model.safetensors``
(a module of names only, so that reading a bundle does not import the training stack)."""

SUMMARY_FILE = "training.json"  # steps, tokens, seconds, dead fraction: written last, marks a finished run
LOG_FILE = "train_log.jsonl"  # one JSON line per logged step
SETTINGS_FILE = "train_config.json"  # the CLT and training configs of the run
CHECKPOINTS_DIR = "checkpoints"  # resumable state, removed once the final weights exist
