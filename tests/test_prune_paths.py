"""Pruning planned against the unpruned model: the one-step counts of a layer, and every
path to a ratio (one step, several slices, several rounds) ending at the same shapes.

The tiny Llama (hidden 64, 2 layers, 2 KV groups, 128 single-channel MLP units): a KV group
is 6144 parameters, a channel 192, a layer's prunable parameters 12288 + 24576 = 36864.
"""

from __future__ import annotations

import pytest
import torch

from fedapp.llm.model import load_base
from fedapp.pruning.importance import block_costs, magnitude_importance
from fedapp.pruning.surgery import (
    PrunePlan,
    iterative_prune,
    layer_counts,
    plan_pruning,
    prunable_parameter_count,
    prune_model,
)

GROUP, CHANNEL, LAYER = 6144, 192, 36864


@pytest.mark.parametrize(("layer", "ratio", "counts"), [
    # tiny: target 0.5 × 36864 = 18432: round(0.5 × 2) = 1 group, (18432 − 6144) / 192 = 64
    ({"self_attn": (2 * GROUP, GROUP), "mlp": (128 * CHANNEL, CHANNEL)}, 0.5,
     {"self_attn": 1, "mlp": 64}),
    # 0.2: round(0.4) = 0 groups, 7372.8 / 192 = 38.4 channels; 0.3: 1 group, 25.6 -> 26
    ({"self_attn": (2 * GROUP, GROUP), "mlp": (128 * CHANNEL, CHANNEL)}, 0.2,
     {"self_attn": 0, "mlp": 38}),
    ({"self_attn": (2 * GROUP, GROUP), "mlp": (128 * CHANNEL, CHANNEL)}, 0.3,
     {"self_attn": 1, "mlp": 26}),
    # SmolLM2-135M: 3 KV groups of 294912, 24 MLP groups of 110592 (64 channels each);
    # 0.5 × 3538944: round(1.5) = 2 groups, (1769472 − 589824) / 110592 = 10.67 -> 11
    ({"self_attn": (884736, 294912), "mlp": (2654208, 110592)}, 0.5,
     {"self_attn": 2, "mlp": 11}),
    ({"self_attn": (884736, 294912), "mlp": (2654208, 110592)}, 0.4264,
     {"self_attn": 1, "mlp": 11}),
    # at least one unit of each kind stays
    ({"self_attn": (2 * GROUP, GROUP), "mlp": (128 * CHANNEL, CHANNEL)}, 0.99,
     {"self_attn": 1, "mlp": 127}),
])
def test_layer_counts_are_the_one_step_plan_of_an_unpruned_layer(layer, ratio, counts):
    assert layer_counts(layer, ratio) == counts


def prune_path(tiny_model_dir, path: list[float], end: float) -> tuple[torch.nn.Module, int]:
    """The tiny model pruned by magnitude to each ratio of `path` in turn (2 slices each),
    every step planned against the unpruned model's block costs."""
    base = load_base(str(tiny_model_dir), "none", "cpu")
    full = block_costs(base)
    for ratio in path:
        iterative_prune(base, ratio, 2, lambda m: None, "magnitude", full=full, end=end)
    return base, prunable_parameter_count(base)


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if n.endswith("_proj")}


@pytest.mark.parametrize("path", [[0.2, 0.3], [0.1, 0.2, 0.3], [0.25, 0.3]])
def test_every_path_to_a_ratio_ends_at_the_one_step_shapes(tiny_model_dir, path):
    one_step, count = prune_path(tiny_model_dir, [0.3], end=0.3)
    stepwise, stepwise_count = prune_path(tiny_model_dir, path, end=0.3)

    # 0.3 of each layer: 1 KV group + 26 channels = 6144 + 4992 = 11136 of 36864
    assert count == stepwise_count == 2 * (LAYER - 11136)
    assert shapes(stepwise) == shapes(one_step)


def test_without_the_end_a_step_can_prune_past_the_one_step_shapes(tiny_model_dir):
    """0.2 alone removes 38 channels a layer, 0.3 alone only 26 (it takes a KV group
    instead): a device that stopped at 0.2 not knowing its end keeps the 38 and ends at
    6144 + 38 × 192 = 13440 of 36864 removed, not 11136."""
    _, count = prune_path(tiny_model_dir, [0.2, 0.3], end=0.0)

    assert count == 2 * (LAYER - 13440)


def test_a_plan_counts_units_already_gone(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "none", "cpu")
    full = block_costs(base)
    prune_model(base, PrunePlan(channels={0: list(range(30))}))  # layer 0: 30 channels gone

    plan = plan_pruning(magnitude_importance(base), 0.3, full)

    # 0.3 of the unpruned layers: 1 KV group and 26 channels each; layer 0 already lost 30
    assert {i: len(g) for i, g in plan.kv_groups.items()} == {0: 1, 1: 1}
    assert {i: len(c) for i, c in plan.channels.items()} == {0: 0, 1: 26}
    with pytest.raises(ValueError, match="end=1.0; allowed"):
        plan_pruning(magnitude_importance(base), 0.3, full, end=1.0)
