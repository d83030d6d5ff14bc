"""FLoRA: exact aggregation of heterogeneous-rank LoRA by stacking.

Each round's update ΔW = Σ p_k s_k B_k A_k is stacked into low-rank factors (exact for any
mix of ranks) and appended to the server-held global update G, kept as factors of rank R.
Selected clients receive G and train a fresh LoRA beside it (G stays frozen, the 4-bit base
is never requantised). Past `rank_budget`, G is re-compressed by a truncated SVD and the
relative error dropped is logged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

from strategies.base import LoraStrategy
from strategies.dp import make_accountant, private_aggregate, spend
from strategies.lora_math import (
    Factors,
    LoraUpdate,
    append_factors,
    join_factors,
    rank_of,
    split_factors,
    stack_factors,
    truncate_factors,
)


class FLoRA(LoraStrategy):
    name = "flora"
    global_mode = "frozen"  # clients keep G = B @ A (scaling 1) frozen beside the base
    supports_dp = True

    def __init__(self, *args, rank_budget: int = 64, dp: Mapping | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(rank_budget, bool) or not isinstance(rank_budget, int) or rank_budget <= 0:
            raise ValueError(f"strategy.rank_budget={rank_budget}; allowed: a positive integer")
        self.rank_budget = rank_budget
        self.global_factors: Factors = {}
        self.dp = dict(dp) if dp else None
        self.accountant = make_accountant(self.dp, self.min_available_nodes) if self.dp else None

    def load_state(self, state: dict, arrays: ArrayRecord) -> None:
        self.global_factors = split_factors(arrays.to_torch_state_dict())
        if self.accountant is not None and state.get("accountant"):
            self.accountant.load_state_dict(state["accountant"])

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict()} if self.accountant else {}

    def round_update(self, server_round: int, updates: list[LoraUpdate]
                     ) -> tuple[Factors, dict[str, float]]:
        """This round's ΔW as factors: exact stacking, or its differentially private version."""
        if self.dp is None:
            return stack_factors(updates), {}
        generator = torch.Generator().manual_seed(self.seed * 7919 + server_round)
        factors, info = private_aggregate(updates, float(self.dp["clip_norm"]),
                                          float(self.dp["noise_multiplier"]), self.rank_budget,
                                          generator)
        info["dp-epsilon"] = spend(self.accountant, float(self.dp["noise_multiplier"]),
                                   len(updates), float(self.dp["delta"]))
        return factors, info

    def aggregate_updates(self, server_round: int, updates: list[LoraUpdate]
                          ) -> tuple[ArrayRecord, dict[str, float]]:
        delta, info = self.round_update(server_round, updates)
        grown = append_factors(self.global_factors, delta)
        self.global_factors, dropped = truncate_factors(grown, self.rank_budget)
        return ArrayRecord(join_factors(self.global_factors)), {
            "global-rank": float(rank_of(self.global_factors)), "svd-dropped-error": dropped,
            **info}

    def global_adapter(self, arrays: ArrayRecord) -> tuple[dict[str, torch.Tensor], int, float]:
        state = arrays.to_torch_state_dict()
        if not state:
            return {}, 0, 0.0
        rank = rank_of(split_factors(state))
        return state, rank, float(rank)  # lora_alpha = R: scaling 1, G = B @ A exactly
