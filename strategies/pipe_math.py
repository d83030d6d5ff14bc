"""FedPipe's math, free of Flower: which modules of a device get LoRA and at which rank, what
that costs the device, and the exact per-module aggregation of such mixed structures.

**Window.** Only the LoRA'd layers and those above them take part in the backward pass
(nothing below needs a gradient), so a device's training memory and step time grow with the
depth d of its window, the top d decoder layers, far more than with the ranks:

    memory(d, P) = fixed_mb + layer_mb · d + lora_mb_per_mparam · P / 1e6
    step(d)      = (forward_s + backward_s · d / N) · slowdown

with P the structure's LoRA parameters and N the model's layers (`estimate`). A device's
window is the deepest whose structure at the grid's largest rank fits its memory budget and
the per-step time budget (`window_depth`); none fitting is a config error.

**Ranks from importance.** Inside its window a device gives module m the rank
r_m = the largest grid rank <= max(grid) · I_m / max_j I_j (at least the smallest), and no
LoRA when I_m / max_j I_j < `min_share` (`ranks_from_importance`). I_m is the device's own
importance of m: the Frobenius norm ‖s B_m A_m‖ of its first accepted update, trained with
every window module at the largest rank (`update_importance`). Before that, all are equal.

**Aggregation.** Module m's round update averages only the clients that trained it, with
their weights renormalised over them (`stack_per_module`):

    Δ_m = Σ_{k ∈ S_m} (w_k / Σ_{j ∈ S_m} w_j) · s_k B_{k,m} A_{k,m}

stacked exactly as FLoRA does, then zero-padded to one rank across modules (zero rows of A
and columns of B add nothing to B @ A) so that the global keeps one rank R per module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch

from strategies.lora_math import LORA_A, LORA_B, Factors, LoraUpdate, split_factors

COST_KEYS = ("fixed_mb", "layer_mb", "lora_mb_per_mparam", "forward_s", "backward_s")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def module_order(module_shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """The target modules in the order a PipeOrder lists their ranks: sorted peft keys."""
    return sorted(module_shapes)


def module_layers(module_shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """{module: its decoder layer index}, from the `.layers.<i>.` in its name; ValueError
    naming a module that sits in no numbered layer."""
    layers = {}
    for key in module_shapes:
        found = _LAYER.search(key)
        if found is None:
            raise ValueError(f"FedPipe windows count decoder layers, but target module {key!r} "
                             "is in no '.layers.<i>.' block; allowed: lora.target_modules "
                             "inside the decoder layers (e.g. q_proj, v_proj)")
        layers[key] = int(found.group(1))
    return layers


def pipe_costs(costs: Mapping | None) -> dict[str, float]:
    """`strategy.costs`: the five coefficients of `estimate`, each a number >= 0."""
    costs = dict(costs or {})
    if sorted(costs) != sorted(COST_KEYS) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            and v >= 0 for v in costs.values()):
        raise ValueError(f"strategy.costs={costs}; allowed: finite numbers >= 0 for exactly "
                         f"{list(COST_KEYS)}")
    return {k: float(v) for k, v in costs.items()}


def lora_parameters(module_shapes: Mapping[str, tuple[int, int]],
                    ranks: Mapping[str, int]) -> int:
    """Σ_m r_m (out_m + in_m): the trainable parameters of a structure."""
    return sum(r * sum(module_shapes[m]) for m, r in ranks.items())


def estimate(costs: Mapping[str, float], depth: int, num_layers: int, parameters: int,
             slowdown: float = 1.0) -> tuple[float, float]:
    """(training memory MB, seconds per step) of a window of `depth` layers (module doc)."""
    memory = (costs["fixed_mb"] + costs["layer_mb"] * depth
              + costs["lora_mb_per_mparam"] * parameters / 1e6)
    seconds = (costs["forward_s"] + costs["backward_s"] * depth / num_layers) * slowdown
    return memory, seconds


def window(layers: Mapping[str, int], depth: int) -> list[str]:
    """The modules of the top `depth` layers, sorted."""
    top = max(layers.values()) + 1
    return sorted(m for m, i in layers.items() if i >= top - depth)


def window_depth(module_shapes: Mapping[str, tuple[int, int]], layers: Mapping[str, int],
                 r_max: int, costs: Mapping[str, float], memory_mb: float, slowdown: float,
                 step_seconds: float | None) -> int:
    """The deepest window (1..N layers) whose structure with every module at `r_max` fits
    `memory_mb` and, when given, `step_seconds` per step; 0 when not even one layer does."""
    num_layers = max(layers.values()) + 1
    for depth in range(num_layers, 0, -1):
        params = lora_parameters(module_shapes, {m: r_max for m in window(layers, depth)})
        memory, seconds = estimate(costs, depth, num_layers, params, slowdown)
        if memory <= memory_mb and (step_seconds is None or seconds <= step_seconds):
            return depth
    return 0


def ranks_from_importance(importance: Mapping[str, float], grid: Sequence[int],
                          min_share: float) -> dict[str, int]:
    """r_m from each module's share of the largest importance (module doc); every module
    equal (or all zero) gives all of them max(grid)."""
    grid = sorted(grid)
    top = max(importance.values(), default=0.0)
    ranks = {}
    for module, value in importance.items():
        share = value / top if top > 0 else 1.0
        if share < min_share:
            ranks[module] = 0
            continue
        ranks[module] = max([g for g in grid if g <= grid[-1] * share + 1e-9] or [grid[0]])
    return ranks


def update_importance(update: LoraUpdate) -> dict[str, float]:
    """‖s B_m A_m‖_F per module of one client's update, without forming B_m A_m:
    ‖BA‖_F² = tr((BᵀB)(AAᵀ)), r×r products."""
    out = {}
    for module, (a, b) in update.factors.items():
        a64, b64 = a.double(), b.double()
        squared = float(torch.trace((b64.T @ b64) @ (a64 @ a64.T)))
        out[module] = abs(update.scaling) * math.sqrt(max(squared, 0.0))
    return out


def stack_per_module(updates: Sequence[LoraUpdate],
                     module_shapes: Mapping[str, tuple[int, int]],
                     dtype: torch.dtype = torch.float64) -> Factors:
    """Δ per module over the clients that trained it, weights renormalised per module,
    zero-padded to one rank (module doc); a module nobody trained is all zeros."""
    stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in module_shapes:
        holders = [u for u in updates if module in u.factors]
        total = sum(u.weight for u in holders)
        if not holders or total <= 0:
            continue
        stacked[module] = (
            torch.cat([(u.weight / total * u.scaling) * u.factors[module][0].to(dtype)
                       for u in holders], dim=0),
            torch.cat([u.factors[module][1].to(dtype) for u in holders], dim=1))
    rank = max((a.shape[0] for a, _ in stacked.values()), default=0)
    if rank == 0:
        raise ValueError("no update covers any target module")
    out: Factors = {}
    for module, (out_features, in_features) in module_shapes.items():
        a, b = stacked.get(module, (torch.zeros(0, in_features, dtype=dtype),
                                    torch.zeros(out_features, 0, dtype=dtype)))
        pad = rank - a.shape[0]
        out[module] = (torch.cat([a, a.new_zeros(pad, in_features)]),
                       torch.cat([b, b.new_zeros(out_features, pad)], dim=1))
    return out


# ---------------------------------------------------------------- the per-module downlink
# A client accepted in round t holds G_{t-1} and its own upload; to rebuild G_t it needs the
# other slots of round t (each covering its own modules) and their weights: the server's
# Δ_t is `stack_per_module` of all slots, and `slots_delta` computes the same numbers for
# the modules any slot or the held global covers (the others are zero on both sides).

def encode_slots(slots: Sequence[Factors], skip: int) -> dict[str, torch.Tensor]:
    """Every slot but `skip` as "<slot index>/<peft key>" arrays."""
    return {f"{j}/{m}{suffix}": t for j, factors in enumerate(slots) if j != skip
            for m, (a, b) in factors.items() for suffix, t in ((LORA_A, a), (LORA_B, b))}


def decode_slots(arrays: Mapping[str, torch.Tensor], count: int, own_slot: int,
                 own: Factors) -> list[Factors]:
    """Inverse of `encode_slots`, with `own` put back at `own_slot`; ValueError naming a
    key that names no other slot."""
    grouped: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for key, tensor in arrays.items():
        slot, _, name = key.partition("/")
        if not slot.isdigit() or int(slot) >= count or int(slot) == own_slot:
            raise ValueError(f"increment array {key[:80]!r} names no other slot of {count}")
        grouped[int(slot)][name] = tensor
    slots = [split_factors(g) for g in grouped]
    slots[own_slot] = dict(own)
    return slots


def slots_delta(slots: Sequence[Factors], weights: Sequence[float], scaling: float,
                held: Factors) -> tuple[Factors, Factors]:
    """(held, Δ) ready for `lora_math.next_global`, both over the same modules: Δ is
    `stack_per_module` of the slots, each module of `held` no slot covers gets Δ's rank in
    zeros, and each module of Δ that `held` lacks gets held's rank in zeros (what the
    server holds for a module nobody trained yet)."""
    shapes = {m: (b.shape[0], a.shape[1]) for f in slots for m, (a, b) in f.items()}
    shapes |= {m: (b.shape[0], a.shape[1]) for m, (a, b) in held.items()}
    updates = [LoraUpdate(f, scaling, w) for f, w in zip(slots, weights, strict=True)]
    delta = stack_per_module(updates, shapes)
    if not held:  # G_0: nothing to append to
        return {}, delta
    a0 = next(iter(held.values()))[0]
    rank, dtype = a0.shape[0], a0.dtype
    full = {m: held.get(m, (torch.zeros(rank, i, dtype=dtype), torch.zeros(o, rank, dtype=dtype)))
            for m, (o, i) in shapes.items()}
    return full, delta
