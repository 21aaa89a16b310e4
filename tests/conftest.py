"""Shared fixtures: small open_clip teachers built locally (no downloads)."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from clt_explorer.teacher import LOCAL_DIR, Teacher
from clt_explorer.tiny_clip import PREPROCESS_CONFIG, TINY_CLIP_CONFIG, save_open_clip_folder


def make_local_teacher(folder, seed: int = 0, model_cfg: dict | None = None) -> Teacher:
    """A randomly initialised open_clip CLIP saved in open_clip's folder format and loaded back."""
    torch.manual_seed(seed)
    cfg = copy.deepcopy(model_cfg or TINY_CLIP_CONFIG)
    model = open_clip.CLIP(**cfg)
    save_open_clip_folder(model, cfg, PREPROCESS_CONFIG, folder)
    return Teacher.load(LOCAL_DIR + str(folder))


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory) -> Teacher:
    return make_local_teacher(tmp_path_factory.mktemp("random_teacher"))
