"""A pruned model's structure as plain arrays: which units of the full model it kept.

This is what a FedSpine device reports after a round, what the server keeps for it and sends
back with its next order, and what the export rebuilds the device's model from, so no
device has to keep anything between rounds and every copy of its model is the same:

    {"<layer>.self_attn": kept KV groups, "<layer>.mlp": kept MLP channels}   (int64, sorted)

indices into the full (unpruned) layer; an empty array means the block was dropped whole;
a block that was never pruned has no key. MLP channels are listed one by one (not as
groups), so the format does not depend on the 4-bit block size.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import torch
from torch import nn

from fedapp.llm.unequal import LAYER_SHAPES
from fedapp.pruning.structure import (
    DroppedBlock,
    channel_group,
    decoder_layers,
    live_blocks,
    num_units,
)
from fedapp.pruning.surgery import PrunePlan, PruneResult, prune_model
from strategies.protocol import UNIT_CRITERIA

Units = dict[str, torch.Tensor]
_BLOCK = re.compile(r"^(?:.*\.)?(\d+)\.(self_attn|mlp)$")


def units_of(model: nn.Module, result: PruneResult) -> Units:
    """The kept units of `model`, pruned from the full model as `result` says."""
    _, layers = decoder_layers(model)
    units: Units = {}
    for name, kept in result.kept.items():
        *_, layer, kind, linear = name.split(".")
        if (kind, linear) == ("self_attn", "k_proj"):
            head_dim = layers[int(layer)].self_attn.head_dim
            units[f"{layer}.self_attn"] = kept.out_idx[::head_dim] // head_dim
        elif (kind, linear) == ("mlp", "up_proj"):
            units[f"{layer}.mlp"] = kept.out_idx.clone()
    for block in result.dropped:
        layer, kind = _BLOCK.match(block).groups()  # type: ignore[union-attr]
        units[f"{layer}.{kind}"] = torch.zeros(0, dtype=torch.long)
    return {k: v.long() for k, v in sorted(units.items())}


def apply_units(model: nn.Module, units: Mapping[str, torch.Tensor]) -> PruneResult:
    """Prune an unpruned `model` in place to `units` (slicing only: no scoring). Raises
    ValueError naming a malformed key, an index out of range or a partial MLP group."""
    live = live_blocks(model)
    plan = PrunePlan()
    for key, kept in sorted(units.items()):
        match = _BLOCK.match(key)
        if match is None or (int(match[1]), match[2]) not in live:
            raise ValueError(f"pruned structure names {key!r}; allowed: '<layer>.self_attn' "
                             f"or '<layer>.mlp' of layers 0..{len(decoder_layers(model)[1]) - 1}")
        block_key = (int(match[1]), match[2])
        block = live[block_key]
        if kept.numel() == 0:
            plan.blocks.append(block_key)
            continue
        group = 1 if block_key[1] == "self_attn" else channel_group(block)
        n = num_units(block, block_key[1]) * group
        kept = kept.long()
        if kept.min() < 0 or kept.max() >= n or not bool((kept[1:] > kept[:-1]).all()):
            raise ValueError(f"pruned structure {key}: kept indices must be sorted, unique "
                             f"and in 0..{n - 1}")
        starts = kept[::group]
        if len(kept) % group or bool((starts % group).any()) or not torch.equal(
                kept, (starts[:, None] + torch.arange(group)).flatten()):
            raise ValueError(f"pruned structure {key}: MLP channels must come in whole "
                             f"groups of {group} (the 4-bit block size)")
        gone = sorted(set(range(n // group)) - set((starts // group).tolist()))
        (plan.kv_groups if block_key[1] == "self_attn" else plan.channels)[block_key[0]] = gone
    return prune_model(model, plan)


def saved_config(model: nn.Module) -> object:
    """The config a pruned model is saved with: `stock_config` when its layers kept one
    shape; else the model's config with each layer's [k rows, q rows, MLP channels] under
    `LAYER_SHAPES` (`fedapp.llm.unequal`: `load_saved` loads it). Dropped blocks:
    stock_config's ValueError."""
    try:
        return stock_config(model)
    except ValueError:
        if _dropped(model):
            raise
    _, layers = decoder_layers(model)
    config = copy.deepcopy(model.config)
    config.head_dim = layers[0].self_attn.head_dim
    setattr(config, LAYER_SHAPES, [list(_shape(layer)) for layer in layers])
    return config


def _shape(layer: nn.Module) -> tuple[int, int, int]:
    return (layer.self_attn.k_proj.out_features, layer.self_attn.q_proj.out_features,
            layer.mlp.up_proj.out_features)


def _dropped(model: nn.Module) -> list[str]:
    return [f"{i}.{kind}" for i, layer in enumerate(decoder_layers(model)[1]) for kind in
            ("self_attn", "mlp") if isinstance(getattr(layer, kind), DroppedBlock)]


def stock_config(model: nn.Module) -> object:
    """`model.config` changed to the pruned shapes, when every layer kept the same number of
    KV groups and MLP channels and no block was dropped (a stock architecture class then
    builds it); else ValueError saying which layers differ."""
    _, layers = decoder_layers(model)
    if dropped := _dropped(model):
        raise ValueError(f"blocks {dropped[:4]} were dropped whole; a stock architecture "
                         "needs every layer's attention and MLP (criterion "
                         f"{' or '.join(UNIT_CRITERIA)})")
    shapes = {_shape(layer) for layer in layers}
    if len(shapes) != 1:
        raise ValueError(f"layers kept unequal shapes {sorted(shapes)} (k rows, q rows, MLP "
                         "channels); a stock architecture needs one shape for all layers")
    (k_rows, q_rows, channels), = shapes
    head_dim = layers[0].self_attn.head_dim
    config = copy.deepcopy(model.config)
    if hasattr(config, LAYER_SHAPES):  # a copy loaded from unequal layers, now equal
        delattr(config, LAYER_SHAPES)
    config.head_dim = head_dim
    config.num_key_value_heads = k_rows // head_dim
    config.num_attention_heads = q_rows // head_dim
    config.intermediate_size = channels
    return config
