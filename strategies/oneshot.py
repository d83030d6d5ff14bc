"""One-shot federated fine-tuning: one round, each client trains its whole local budget.

With `budget_rounds: R` (the config's `num_rounds`), each client trains
R × `train.local_steps` steps from the same base, once; the server aggregates once, by stacking (`combine: stack`, exact, any
ranks) or by averaging the factors (`combine: average`, one rank), and broadcasts nothing.
Aggregation is a weighted sum, so a client that answers late can be folded in afterwards
(`strategies.late_math.fold_in` / `fold_in_average`, and `python -m fedapp.tools.late_merge`).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from strategies.base import ClientIdentity, LoraStrategy
from strategies.lora_math import (
    LoraUpdate,
    fedavg_factors,
    join_factors,
    rank_of,
    split_factors,
    stack_factors,
)

COMBINES = ("stack", "average")


class OneShot(LoraStrategy):
    name = "oneshot"

    def __init__(self, *args, combine: str = "stack", budget_rounds: int = 1, **kwargs) -> None:
        """`budget_rounds`: the rounds whose local steps this one round replaces."""
        if isinstance(budget_rounds, bool) or not isinstance(budget_rounds, int) \
                or budget_rounds < 1:
            raise ValueError(f"strategy.budget_rounds={budget_rounds!r}; allowed: an int >= 1 "
                             "(it follows num_rounds)")
        self.budget_rounds = budget_rounds
        super().__init__(*args, **kwargs)
        if combine not in COMBINES:
            raise ValueError(f"strategy.combine={combine!r}; allowed: {list(COMBINES)}")
        if combine == "average" and len(set(self.ranks or [])) != 1:
            raise ValueError(f"strategy.combine='average' needs one rank, got strategy.ranks="
                             f"{self.ranks}; allowed: a single rank, or combine='stack'")
        self.combine = combine
        self.total_weight = 0.0
        self.scaling = 1.0

    def num_rounds(self, configured: int) -> int:
        return 1

    def order_steps(self) -> int:
        return self.local_steps * self.budget_rounds

    def client_arrays(self, client: ClientIdentity,
                      state: dict[str, torch.Tensor]) -> ArrayRecord:
        return ArrayRecord()  # everyone starts from the base (global_mode "none")

    def aggregate_updates(self, server_round: int, updates: list[LoraUpdate]
                          ) -> tuple[ArrayRecord, dict[str, float]]:
        self.total_weight = sum(u.weight for u in updates)
        if self.combine == "stack":
            factors = stack_factors(updates)
            self.scaling = 1.0
        else:
            factors = fedavg_factors(updates)
            self.scaling = updates[0].scaling
        return ArrayRecord(join_factors(factors)), {"budget-steps": float(self.order_steps())}

    def global_adapter(self, arrays: ArrayRecord) -> tuple[dict[str, torch.Tensor], int, float]:
        state = arrays.to_torch_state_dict()
        if not state:
            return {}, 0, 0.0
        rank = rank_of(split_factors(state))
        return state, rank, self.scaling * rank

    def export_metadata(self) -> dict:
        return {"strategy": self.name, "combine": self.combine,
                "total-weight": self.total_weight, "scaling": self.scaling}
