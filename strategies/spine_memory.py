"""FedSpine's memory model: what a client needs to train one (prune ratio, rank) arm.

`estimated_memory_mb` = base·(1 − ratio) + lora_mb_per_rank·rank + activations;
`memory_feasible(budget, ...)` turns it into the predicate that keeps a device's arms within
its memory budget (`ClientBandit.select`'s `feasible`); `needed_prune_ratio` inverts it, the
least ratio at which a rank fits.
"""

from __future__ import annotations

import math

from strategies.bandit import Arm, Feasible


def estimated_memory_mb(prune_ratio: float, rank: int, base_mb: float, lora_mb_per_rank: float,
                        activation_mb: float) -> float:
    """Peak training memory of a client for one arm: base·(1 − ratio) + lora·rank + activations.

    base_mb: the (quantised) frozen model; structured pruning removes that share of it.
    lora_mb_per_rank: adapter weights + gradients + optimiser moments per unit of rank.
    activation_mb: what pruning does not shrink: activations at the training batch size (the
    hidden size, which dominates them, is not pruned), and in FedSpine's use (`fixed_mb`) also
    the runtime, the embeddings / LM head and the logits.
    """
    Arm(prune_ratio, rank)  # validates both
    for name, value in (("base_mb", base_mb), ("lora_mb_per_rank", lora_mb_per_rank),
                        ("activation_mb", activation_mb)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"estimated_memory_mb: {name}={value!r}; allowed: finite, >= 0")
    return base_mb * (1.0 - prune_ratio) + lora_mb_per_rank * rank + activation_mb


def memory_feasible(budget_mb: float, base_mb: float, lora_mb_per_rank: float,
                    activation_mb: float) -> Feasible:
    """The predicate "this arm fits in `budget_mb`" for a device, to pass to `select`."""
    def fits(arm: Arm) -> bool:
        return estimated_memory_mb(arm.prune_ratio, arm.rank, base_mb, lora_mb_per_rank,
                                   activation_mb) <= budget_mb
    return fits


def needed_prune_ratio(budget_mb: float, rank: int, base_mb: float, lora_mb_per_rank: float,
                       activation_mb: float) -> float:
    """The least prune ratio at which `estimated_memory_mb` with `rank` fits `budget_mb`
    (0 when the unpruned model fits; math.inf when no ratio below 1 does)."""
    room = budget_mb - activation_mb - lora_mb_per_rank * rank
    if room >= base_mb:
        return 0.0
    if room <= 0:
        return math.inf
    return 1.0 - room / base_mb
