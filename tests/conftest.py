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
# Pruned copies stored on disk (fedapp.client.store) live in the user's cache; the tests
# that exercise the store turn it on with a cache of their own.
os.environ["FEDAPP_PRUNED_STORE"] = "0"

from tests.tiny import FAMILIES, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", params=FAMILIES)
def family_model_dir(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(family, a tiny model of it): every model family the app is tested with."""
    return request.param, build_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"),
                                           family=request.param)


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama whose MLP has 8 whole 4-bit blocks per down_proj row (channel
    groups of 64: pruned in 4-bit, its kept weights keep their codes) and 4 query / 2 KV
    heads of 16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("wide")
    LlamaForCausalLM(config).save_pretrained(out)
    return str(out)
