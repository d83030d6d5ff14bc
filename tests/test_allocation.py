"""A prune allocated across layers (`fedapp.pruning.allocation`): hand-computed plans, the
floor each layer keeps, its options refused by name, a model pruned this way in one step
and over rounds, and its stored copy pruned further."""

from __future__ import annotations

import pytest
import torch

from fedapp.pruning.allocation import global_removals
from fedapp.pruning.importance import Importance
from fedapp.pruning.structure import decoder_layers
from fedapp.pruning.surgery import iterative_prune, plan_pruning, prunable_parameter_count
from strategies.protocol import PruneOrder
from strategies.spine_config import prune_template

A, M = "self_attn", "mlp"


def importance(mlp1: tuple[float, ...] = (9.0, 9.0, 0.2, 9.0)) -> Importance:
    """Two layers: 2 KV groups of 10 parameters and 4 MLP channels of 5 per layer. Scores
    per parameter: layer 0 attention 0.1, 0.8; MLP 0.2, 0.4, 0.6, 0.8; layer 1 attention
    0.4, 0.05; MLP 1.8, 1.8, 0.04, 1.8."""
    units = {(0, A): torch.tensor([1.0, 8.0]), (0, M): torch.tensor([1.0, 2.0, 3.0, 4.0]),
             (1, A): torch.tensor([4.0, 0.5]), (1, M): torch.tensor(mlp1)}
    costs = {(0, A): 10, (0, M): 5, (1, A): 10, (1, M): 5}
    return Importance(units, costs, {key: cost * len(units[key]) for key, cost in costs.items()})


FULL = {(0, A): 20, (0, M): 20, (1, A): 20, (1, M): 20}


def test_units_go_in_ascending_score_per_parameter_across_layers():
    # target 0.25 x 80 = 20: 1.mlp[2] (5), 1.attn[1] (15), 0.attn[0] would make 25 (no
    # closer than 15), 0.mlp[0] makes exactly 20; nothing after brings it closer
    assert global_removals(importance(), 0.25, FULL) == {(1, M): [2], (1, A): [1], (0, M): [0]}
    plan = plan_pruning(importance(), 0.25, FULL, allocation="global")
    assert (plan.kv_groups, plan.channels) == ({1: [1]}, {0: [0], 1: [2]})


def test_each_layer_keeps_its_floor_and_units_already_gone_count():
    # 0.9 of 80 = 72 is more than the 50 the floors leave removable: every unit but the
    # best of each (layer, kind) goes (MIN_KEEP 0.1 of 2 or 4 units rounds up to 1)
    plan = global_removals(importance(), 0.9, FULL)
    assert plan == {(0, A): [0], (0, M): [0, 1, 2], (1, A): [1], (1, M): [0, 1, 2]}
    # layer 1's MLP already lost one channel (3 left, positions renumbered): 5 of the 20 are
    # gone, so 15 more are removed: 1.mlp[1] (0.04), 1.attn[1] (0.05)
    gone = importance(mlp1=(9.0, 0.2, 9.0))
    gone.block_cost[1, M] = 15
    assert global_removals(gone, 0.25, FULL) == {(1, M): [1], (1, A): [1]}


def test_bad_allocations_are_refused_by_name():
    with pytest.raises(ValueError, match=r"allocation='layers'; allowed: \['uniform', "
                                         r"'global'\]"):
        plan_pruning(importance(), 0.25, FULL, allocation="layers")
    blocks = importance()
    blocks.blocks = {(0, A): 0.1}
    with pytest.raises(ValueError, match="llm-drop scores whole blocks"):
        global_removals(blocks, 0.25, FULL)
    with pytest.raises(ValueError, match=r"strategy.prune.criterion='magnitude'; allowed: "
                                         r"\['fisher', 'taylor'\] with allocation 'global'"):
        prune_template({"criterion": "magnitude", "allocation": "global"})
    with pytest.raises(ValueError, match=r"strategy.prune.allocation='even'; allowed: "):
        prune_template({"allocation": "even"})
    assert prune_template({"allocation": "global"}).allocation == "global"
    assert PruneOrder(ratio=0.5).allocation == "uniform"


def test_a_fisher_prune_allocated_globally_reaches_the_ratio_with_unequal_layers(wide_dir):
    from fedapp.llm.model import load_base

    model = load_base(wide_dir, "nf4", "cpu")
    before = prunable_parameter_count(model)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 1000, (2, 24), generator=gen),
                "attention_mask": torch.ones(2, 24, dtype=torch.long)} for _ in range(2)]

    iterative_prune(model, 0.5, 1, lambda m: None, "fisher", batches=batches,
                    allocation="global")

    layers = decoder_layers(model)[1]
    shapes = {(layer.self_attn.k_proj.out_features, layer.mlp.up_proj.out_features)
              for layer in layers}
    removed = 1 - prunable_parameter_count(model) / before
    assert abs(removed - 0.5) < 0.05  # MLP units are 64-channel groups of 12288 parameters
    assert len(shapes) == 2  # this model's scores leave its two layers unequal
    assert all(layer.mlp.up_proj.out_features >= 64 and layer.self_attn.k_proj.out_features
               >= 16 for layer in layers)  # the floor: one unit of each kind
