"""Zero-padding (HetLoRA-style): pad heterogeneous-rank factors to the largest rank, average.

The baseline FLoRA is measured against: B @ A of the padded averages is not the average
update, and we log how far off it is (`zeropad-error`) every round. Clients start from the
first r_k rows of A / columns of B of the global factors.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from strategies.base import ClientIdentity, LoraStrategy
from strategies.lora_math import (
    LoraUpdate,
    join_factors,
    rank_of,
    relative_error,
    split_factors,
    zeropad_factors,
)


class ZeroPad(LoraStrategy):
    name = "zeropad"
    global_mode = "init"

    def client_state(self, client: ClientIdentity,
                     state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r, scaling = self.rank_for(client), self.client_scaling(client)
        truncated = {m: (a[:r] / scaling, b[:, :r])  # s · B[:, :r] · A[:r] / s
                     for m, (a, b) in split_factors(state).items()}
        return join_factors(truncated)

    def aggregate_updates(self, server_round: int, updates: list[LoraUpdate]
                          ) -> tuple[ArrayRecord, dict[str, float]]:
        padded = zeropad_factors(updates)
        return ArrayRecord(join_factors(padded)), {
            "zeropad-error": relative_error(padded, updates)}

    def global_adapter(self, arrays: ArrayRecord) -> tuple[dict[str, torch.Tensor], int, float]:
        state = arrays.to_torch_state_dict()
        if not state:
            return {}, 0, 0.0
        rank = rank_of(split_factors(state))
        return state, rank, float(rank)  # scaling folded into A: lora_alpha = r
