"""Shared fixtures: a tiny Llama built from a config (never the pretrained model)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.tiny import FAMILIES, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", params=FAMILIES)
def family_model_dir(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(family, a tiny model of it): every model family the app is tested with."""
    return request.param, build_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"),
                                           family=request.param)
