"""Late arrivals of one-shot aggregation: a client that answers after the round closed is
added to the aggregate afterwards, and the result equals aggregating everyone at once."""

from __future__ import annotations

import torch

from strategies.lora_math import Factors, LoraUpdate


def fold_in(global_factors: Factors, total_weight: float, late: LoraUpdate) -> Factors:
    """Add a late client to a stacked aggregate of clients whose weights summed to
    `total_weight`: the result equals stacking everyone at once (aggregation is a sum)."""
    new_total = total_weight + late.weight
    keep, share = total_weight / new_total, late.weight / new_total
    out: Factors = {}
    for module, (a_g, b_g) in global_factors.items():
        a_l, b_l = late.factors[module]
        out[module] = (torch.cat([keep * a_g.float(), share * late.scaling * a_l.float()]),
                       torch.cat([b_g.float(), b_l.float()], dim=1))
    return out


def fold_in_average(global_factors: Factors, total_weight: float, late: LoraUpdate) -> Factors:
    """The averaging counterpart of `fold_in`: A and B re-averaged with the late client's
    weight, equal to averaging all clients at once (same rank and scaling required)."""
    new_total = total_weight + late.weight
    keep, share = total_weight / new_total, late.weight / new_total
    return {m: (keep * a.float() + share * late.factors[m][0].float(),
                keep * b.float() + share * late.factors[m][1].float())
            for m, (a, b) in global_factors.items()}
