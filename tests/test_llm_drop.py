"""LLM-Drop's block scores (`fedapp.pruning.importance.llm_drop_importance`) for every model
family: 1 − cos(x, x + f(x)) with x the residual stream entering a block and f(x) what it
adds, checked against the hidden states the model itself returns."""

from __future__ import annotations

import pytest
import torch

from fedapp.llm.model import load_base
from fedapp.pruning.importance import llm_drop_importance


def test_llm_drop_compares_the_residual_stream_before_and_after_each_block(family_model_dir):
    # Prepare: layer 0's MLP adds nothing (down_proj zero), layer 1's attention adds nothing
    # (o_proj zero); so x_mid of layer 0 is its output and x_mid of layer 1 its input
    _, path = family_model_dir
    base = load_base(str(path), "none", "cpu")
    layers = base.model.layers
    with torch.no_grad():
        layers[0].mlp.down_proj.weight.zero_()
        layers[1].self_attn.o_proj.weight.zero_()
    ids = torch.randint(5, base.config.vocab_size, (2, 12), generator=torch.Generator()
                        .manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    # Execute
    scores = llm_drop_importance(base, [inputs]).blocks

    # Assert: against the hidden states the model itself returns (h_i enters layer i)
    with torch.no_grad():
        h = base(**inputs, output_hidden_states=True).hidden_states

    def drop(x, y):  # 1 - cos over tokens, averaged
        return float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).mean())

    assert scores[(0, "self_attn")] == pytest.approx(drop(h[0], h[1]), abs=1e-5)
    assert scores[(0, "mlp")] == pytest.approx(0.0, abs=1e-6)
    assert scores[(1, "self_attn")] == pytest.approx(0.0, abs=1e-6)
    assert scores[(1, "mlp")] == pytest.approx(drop(h[1], h[2]), abs=1e-5)
    assert scores[(0, "self_attn")] > 1e-3 and scores[(1, "mlp")] > 1e-3
