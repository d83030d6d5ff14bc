"""The structure structured pruning works on: which Linears make up a prunable unit, the
decoder layers and their live blocks, unit counts, parameter counts and dense weights.

Units: a KV group (one key/value head with the `num_key_value_groups` query heads sharing it:
q/k/v rows + o columns) and an MLP channel (gate/up rows + down column); a whole block (a
layer's `self_attn` or `mlp`) can be dropped, replaced by `DroppedBlock`. Shared by the
importance criteria (`fedapp.pruning.importance`) and the surgery (`fedapp.pruning.surgery`).
"""

from __future__ import annotations

import torch
from torch import nn

BLOCKS = ("self_attn", "mlp")
# Per block: Linears cut by rows, Linears cut by columns. A unit owns equal contiguous
# slices of each (q: n_rep·head_dim rows, k/v: head_dim rows, o: n_rep·head_dim columns;
# gate/up: one row, down: one column), since query head h uses KV head h // n_rep.
UNIT_LINEARS = {"self_attn": (("q_proj", "k_proj", "v_proj"), ("o_proj",)),
                "mlp": (("gate_proj", "up_proj"), ("down_proj",))}
Block = tuple[int, str]  # (layer index, "self_attn" | "mlp")


class DroppedBlock(nn.Module):
    """Stands in for a dropped attention or MLP block: its residual contribution is zero."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object
                ) -> torch.Tensor | tuple[torch.Tensor, None]:
        zeros = torch.zeros_like(hidden_states)  # (batch, seq, hidden)
        return (zeros, None) if self.kind == "self_attn" else zeros


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers and their module-name prefix, through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, module in base.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return name, module
    raise ValueError(f"{type(base).__name__} has no decoder `layers`; allowed: Llama-family LMs")


def check_prunable(model: nn.Module) -> None:
    """Refuse, naming the family, a model whose decoder layers are not built from the units
    this pruning knows (separate q/k/v/o projections with a `head_dim`, a gated MLP of
    gate/up/down projections): Llama, Mistral, Qwen2, Gemma-3 and their kin are; GPT-2,
    GPT-NeoX, Phi-3 (fused qkv), Falcon and others are not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = f"{type(base).__name__} (model_type {getattr(base.config, 'model_type', '?')!r})"
    allowed = ("allowed: decoder layers with self_attn.{q,k,v,o}_proj and head_dim, and "
               "mlp.{gate,up,down}_proj (Llama, Mistral, Qwen2, Gemma-3 families), or a "
               "strategy that does not prune")
    try:
        _, layers = decoder_layers(model)
    except ValueError:
        raise ValueError(f"structured pruning does not support {family}: no decoder "
                         f"`layers`; {allowed}") from None
    for i, layer in enumerate(layers):
        for kind, (rows, cols) in UNIT_LINEARS.items():
            block = getattr(layer, kind, None)
            if isinstance(block, DroppedBlock):
                continue
            missing = [f"{kind}.{n}" for n in (*rows, *cols)
                       if not hasattr(getattr(block, n, None), "in_features")]
            if kind == "self_attn" and block is not None and not hasattr(block, "head_dim"):
                missing.append("self_attn.head_dim")
            if block is None or missing:
                raise ValueError(f"structured pruning does not support {family}: layer {i} "
                                 f"lacks {missing or [kind]}; {allowed}")


def live_blocks(model: nn.Module) -> dict[Block, nn.Module]:
    _, layers = decoder_layers(model)
    return {(i, kind): getattr(layer, kind) for i, layer in enumerate(layers) for kind in BLOCKS
            if not isinstance(getattr(layer, kind), DroppedBlock)}


def num_units(block: nn.Module, kind: str) -> int:
    return block.k_proj.out_features // block.head_dim if kind == "self_attn" else \
        block.up_proj.out_features // channel_group(block)


MIN_CHANNEL_GROUPS = 8  # fewer block-wide groups than this: prune single channels


def channel_group(block: nn.Module) -> int:
    """MLP channels that form one unit: a 4-bit down_proj's quantisation block size, when its
    rows are whole blocks and the MLP has at least MIN_CHANNEL_GROUPS of them (SmolLM2: 24);
    else 1. Removing whole blocks of every down_proj row leaves the kept weights in their
    own blocks, so re-quantising them gives back the same 4-bit codes: pruning adds no
    weight error (single channels mix blocks: ~7 % more error on SmolLM2). Decided once,
    on the unpruned block, and kept on it: pruning down to fewer groups keeps the width."""
    if (known := getattr(block, "fedapp_channel_group", None)) is not None:
        return known
    down = base_linear(block.down_proj)
    state = getattr(down.weight, "quant_state", None)
    size = int(getattr(state, "blocksize", 1) or 1) if state is not None else 1
    whole = size > 1 and down.in_features % size == 0
    block.fedapp_channel_group = size if whole and down.in_features // size >= \
        MIN_CHANNEL_GROUPS else 1
    return block.fedapp_channel_group


def base_linear(module: nn.Module) -> nn.Module:
    """The Linear (plain or bnb Linear4bit) under a peft LoRA wrapper, or the module itself."""
    return module.base_layer if hasattr(module, "lora_A") else module


def linear_params(module: nn.Module) -> int:
    linear = base_linear(module)
    return linear.in_features * linear.out_features + (
        0 if linear.bias is None else linear.bias.numel())


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The weight as a float32 (out, in) tensor; 4-bit weights are dequantised."""
    state = getattr(linear.weight, "quant_state", None)
    if state is None:
        return linear.weight.detach().float()
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("a Linear4bit weight was repacked for CPU inference (bnb bug) and "
                         "cannot be dequantised; call disable_bnb_cpu_repack before any forward")
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(linear.weight.data, state).float()  # (out, in)
