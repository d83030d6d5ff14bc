"""A pruned client's copies of the base, and what its reply says about them.

Pruning slices layers in place, so a pruned round works on a copy of the base
(`load_base`), never on the process's cached one. The server sends each device the
structure it reached (`fedapp.pruning.units`); a process that still holds a copy at that
structure (same model, partition and device) reuses it, else it loads the copy stored on
the device's disk after the round that reached it (`fedapp.client.store`: a deployed
SuperNode starts a process per message), else the structure is rebuilt from a fresh copy of
the base by slicing alone (no scoring). The last `FEDAPP_PRUNED_CACHE` copies (default 8;
SmolLM2-135M: about 0.1 GB each) are kept in the process.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedapp.llm.adapters import PEFT_PREFIX
from fedapp.pruning.structure import Block
from fedapp.pruning.surgery import PruneResult
from strategies.lora_math import join_factors, split_factors
from strategies.protocol import KEPT_IN, KEPT_OUT
from strategies.scatter import slice_factors


@dataclass
class PrunedCopy:
    """A pruned base (its LoRA removed), how it was pruned from the full base, the peft keys
    of every target module the full base has (the reply names kept indices for all of
    them) and the full base's prunable parameters per block (`block_costs`: what pruning
    plans against, so every path to a ratio ends at the same shapes: with the uniform
    allocation; a global one reaches the same ratio)."""

    base: torch.nn.Module
    result: PruneResult
    targets: list[str]
    full_costs: dict[Block, int]

    @property
    def full_prunable(self) -> int:
        """The full base's prunable parameter count."""
        return sum(self.full_costs.values())


def units_key(units: Mapping[str, torch.Tensor]) -> tuple:
    """A hashable form of a pruned structure, for the cache key."""
    return tuple((k, tuple(v.tolist())) for k, v in sorted(units.items()))


_COPIES: OrderedDict[tuple, PrunedCopy] = OrderedDict()


def count_setting(name: str, default: int = 8) -> int:
    """An environment setting that counts copies kept (0: none); ValueError otherwise."""
    value = os.environ.get(name, str(default))
    if not value.isdigit():
        raise ValueError(f"{name}={value!r}; allowed: an integer >= 0 (0: none kept)")
    return int(value)


def cache_size() -> int:
    return count_setting("FEDAPP_PRUNED_CACHE")


def target_keys(base: torch.nn.Module, target_modules: tuple[str, ...]) -> list[str]:
    """The peft keys of every LoRA target module of `base` (a pruned base without dropped
    blocks has the full base's)."""
    return [PEFT_PREFIX + name for name, module in base.named_modules()
            if name.rsplit(".", 1)[-1] in target_modules and hasattr(module, "in_features")]


def take_copy(key: tuple) -> PrunedCopy | None:
    """The copy pruned earlier for `key`, removed from the cache while a round uses it."""
    return _COPIES.pop(key, None)


def keep_copy(key: tuple, copy: PrunedCopy) -> None:
    _COPIES[key] = copy
    while len(_COPIES) > cache_size():
        _COPIES.popitem(last=False)  # least recently used


def in_dropped(key: str, result: PruneResult) -> bool:
    """Whether the peft module `key` lies inside a block the pruning dropped whole."""
    name = key.removeprefix(PEFT_PREFIX)
    return any(name.startswith(block + ".") for block in result.dropped)


def slice_global(state: Mapping[str, torch.Tensor],
                 result: PruneResult) -> dict[str, torch.Tensor]:
    """The global update G cut to a pruned copy's layers: (B[kept_out]) @ (A[:, kept_in]) =
    G[kept_out][:, kept_in]; modules inside dropped blocks left out.

    G may come whole or already cut to the structure the copy was rebuilt to (FedSpine's
    server cuts it to what the device kept): a side whose size already equals its kept
    count is taken as it is (a whole side is larger unless nothing of it was pruned, and
    then the cut is the identity); a side of any other size is cut by its kept indices
    (`slice_factors` refuses indices past the side's end or repeated)."""
    if not state:
        return {}
    factors = {k: v for k, v in split_factors(state).items() if not in_dropped(k, result)}
    kept = {}
    for name, k in result.kept.items():
        if (key := PEFT_PREFIX + name) in factors:
            a, b = factors[key]
            kept[key] = (None if b.shape[0] == k.out_idx.numel() else k.out_idx,
                         None if a.shape[1] == k.in_idx.numel() else k.in_idx)
    return join_factors(slice_factors(factors, kept))


def kept_arrays(result: PruneResult, targets: list[str]) -> dict[str, torch.Tensor]:
    """Per pruned target module (peft key): kept rows and columns of the full layer, int64;
    both empty for a module inside a dropped block. Unpruned modules are left out."""
    out: dict[str, torch.Tensor] = {}
    for key in targets:
        name = key.removeprefix(PEFT_PREFIX)
        if name in result.kept:
            out[key + KEPT_OUT] = result.kept[name].out_idx.long()
            out[key + KEPT_IN] = result.kept[name].in_idx.long()
        elif in_dropped(key, result):
            out[key + KEPT_OUT] = torch.zeros(0, dtype=torch.long)
            out[key + KEPT_IN] = torch.zeros(0, dtype=torch.long)
    return out
