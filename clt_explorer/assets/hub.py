"""Publishing a finished bundle to the Hugging Face Hub, with a model card."""

from __future__ import annotations

import json

from ..evaluation.tables import evaluation_summary_markdown
from ..storage import write_bytes
from ..training.outputs import CHECKPOINTS_DIR
from .bundle import Bundle, validate_repo_id

CARD = "README.md"


def model_card(bundle: Bundle) -> str:
    """A model card stating teacher, dataset, settings and the evaluation summary."""
    m = bundle.manifest
    teacher = m["teacher"]
    dataset = m["dataset"]
    lines = [
        "---",
        "tags: [cross-layer-transcoder, clip, interpretability, clt-explorer]",
        "library_name: clt-explorer",
        "---",
        f"# {bundle.name}",
        "",
        "Cross-Layer Transcoders (CLTs) trained on a frozen CLIP image tower with clt-explorer. "
        "Open it in the app with `python app.py --bundle hf://OWNER/REPO`.",
        "",
        f"- **Teacher**: `{teacher['model']}`" + (f" with pretrained weights `{teacher['pretrained']}`"
                                                  if teacher.get("pretrained") else ""),
        f"- **Dataset**: `{dataset['name']}` ({len(dataset['classnames'])} classes, "
        f"{len(dataset['templates'])} prompt templates)" + (f"; label rule: {dataset['label_rule']}"
                                                             if dataset.get("label_rule") else ""),
        f"- **CLTs**: {', '.join(bundle.clt_names) or 'none'}",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(m.get("settings", {}), indent=2),
        "```",
        "",
        "## Evaluation",
        "",
        *evaluation_summary_markdown(m.get("evaluation", {})),
    ]
    return "\n".join(lines) + "\n"


def push_bundle(bundle: Bundle, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Write the model card and upload the bundle folder to ``repo_id``; returns the commit URL."""
    from huggingface_hub import HfApi

    validate_repo_id(repo_id)
    write_bytes(bundle.root / CARD, model_card(bundle).encode())
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(bundle.root),
                               commit_message=f"Upload bundle {bundle.name}",
                               ignore_patterns=[f"**/{CHECKPOINTS_DIR}/**", "**/*.tmp"])
    return str(commit)
