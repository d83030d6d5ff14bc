"""FedSpine's client round on a tiny model: pruning with the global term following the
pruned layers, replies that match their kept indices, ratio 0, bad orders, and a
configuration pruned once per process."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedapp.client import spine as spine_client
from fedapp.llm.adapters import PEFT_PREFIX, attach_lora
from fedapp.config import compose_config, train_template
from fedapp.llm.model import cached_base, load_base
from fedapp.pruning.surgery import iterative_prune, parameter_count
from fedapp.client.spine import GlobalTerm, run_spine_round
from strategies.lora_math import LORA_A, LORA_B, split_factors
from strategies.scatter import KEPT_IN, KEPT_OUT


def tiny_instructions(tiny_model_dir, **kwargs):
    cfg = compose_config(f"model.path={tiny_model_dir} train.local_steps=6 "
                         "train.max_length=48 partitioner=iid")
    return dataclasses.replace(train_template(cfg), spine_round=True, lora_r=4,
                               lora_alpha=8.0, global_mode="frozen", **kwargs)


def random_global(shapes: dict[str, tuple[int, int]], r: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    state = {}
    for key, (n_out, n_in) in shapes.items():
        state[key + LORA_A] = 0.1 * torch.randn(r, n_in, generator=gen)
        state[key + LORA_B] = 0.1 * torch.randn(n_out, r, generator=gen)
    return state


def test_global_term_follows_the_pruned_layers_exactly(tiny_model_dir):
    model = attach_lora(load_base(str(tiny_model_dir), "none", "cpu"), 4, 8,
                        ["q_proj", "o_proj"], seed=0)
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if hasattr(m, "lora_A")}
    g = split_factors(random_global(shapes))
    term = GlobalTerm(model, g)
    result = iterative_prune(model, 0.5, 2, lambda m: None, "magnitude",
                             on_prune=term.reslice)
    key = PEFT_PREFIX + "model.layers.1.self_attn.o_proj"
    kept = result.kept["model.layers.1.self_attn.o_proj"]
    layer = dict(model.named_modules())[key]
    x = torch.randn(2, 3, layer.in_features)  # (batch, seq, in kept)

    with torch.no_grad():
        hooked = layer(x)
        term.remove()
        plain = layer(x)
    a, b = g[key]
    dense = (b @ a)[kept.out_idx][:, kept.in_idx]  # G restricted to the kept units

    assert layer.in_features < shapes[key][1]
    torch.testing.assert_close(hooked - plain, x @ dense.T, atol=1e-5, rtol=1e-4)


def test_pruned_round_replies_factors_that_match_its_kept_indices(tiny_model_dir):
    inst = tiny_instructions(tiny_model_dir, prune_ratio=0.5, prune_slices=2, tune_steps=2)
    shapes = {PEFT_PREFIX + n: (m.out_features, m.in_features) for n, m in
              cached_base(str(tiny_model_dir), "nf4", "cpu").named_modules()
              if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}
    before = parameter_count(cached_base(str(tiny_model_dir), "nf4", "cpu"))

    state, metrics, kept = run_spine_round(inst, 0, 2, random_global(shapes), "cpu")

    factors = split_factors(state)
    assert set(factors) == set(shapes)
    pruned = 0
    for key, (a, b) in factors.items():
        rows, cols = kept.get(key + KEPT_OUT), kept.get(key + KEPT_IN)
        n_out = shapes[key][0] if rows is None else rows.numel()
        n_in = shapes[key][1] if cols is None else cols.numel()
        assert a.shape == (4, n_in) and b.shape == (n_out, 4)
        pruned += (n_out, n_in) != shapes[key]
    assert pruned > 0 and metrics["params-ratio"] < 0.85
    assert math.isfinite(metrics["loss-before"]) and math.isfinite(metrics["loss-after"])
    assert metrics["train-seconds"] >= metrics["tune-seconds"] > 0
    # the process's cached base, which unpruned rounds use, is untouched
    assert parameter_count(cached_base(str(tiny_model_dir), "nf4", "cpu")) == before


def test_ratio_zero_round_prunes_nothing_and_learns(tiny_model_dir):
    inst = tiny_instructions(tiny_model_dir, prune_ratio=0.0, local_steps=12, lr=0.01)

    _, metrics, kept = run_spine_round(inst, 0, 2, {}, "cpu")

    assert kept == {} and metrics["params-ratio"] == 1.0
    assert metrics["loss-after"] < metrics["loss-before"]


def test_bad_pruning_orders_name_the_key(tiny_model_dir):
    with pytest.raises(ValueError, match="prune-criterion='l1'"):
        run_spine_round(tiny_instructions(tiny_model_dir, prune_criterion="l1"), 0, 2, {})
    with pytest.raises(ValueError, match="prune-slices=7"):
        run_spine_round(tiny_instructions(tiny_model_dir, prune_ratio=0.5, prune_slices=7),
                        0, 2, {})


@pytest.fixture()
def empty_pruned_cache(monkeypatch):
    monkeypatch.delenv("FEDAPP_PRUNED_CACHE", raising=False)
    spine_client._PRUNED.clear()
    yield
    spine_client._PRUNED.clear()


@pytest.mark.parametrize("criterion", ["llm-drop", "taylor"])
def test_a_configuration_is_pruned_once_per_process(tiny_model_dir, criterion,
                                                    empty_pruned_cache):
    inst = tiny_instructions(tiny_model_dir, prune_ratio=0.5, prune_criterion=criterion,
                             prune_slices=2, tune_steps=2)
    shapes = {PEFT_PREFIX + n: (m.out_features, m.in_features) for n, m in
              cached_base(str(tiny_model_dir), "nf4", "cpu").named_modules()
              if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}
    g = random_global(shapes)

    first = run_spine_round(inst, 1, 2, g, "cpu")
    again = run_spine_round(dataclasses.replace(inst, seed=5), 1, 2, g, "cpu")

    assert (first[1]["pruned-before"], again[1]["pruned-before"]) == (0.0, 1.0)
    assert first[2].keys() == again[2].keys()
    for key, index in first[2].items():
        assert torch.equal(index, again[2][key])
    assert {k: v.shape for k, v in first[0].items()} == {k: v.shape for k, v in again[0].items()}
    assert again[1]["params-ratio"] == first[1]["params-ratio"] < 1
    # both rounds measure L_before on the model the server sent (unpruned base + G), so a
    # reused pruned copy is still charged its pruning damage
    assert again[1]["loss-before"] == pytest.approx(first[1]["loss-before"], rel=1e-5)
    assert math.isfinite(again[1]["loss-after"])
