"""Zero-padding (HetLoRA-style): pad heterogeneous-rank factors to the largest rank, average.

The baseline FLoRA is measured against: B @ A of the padded averages is not the average
update, and we log how far off it is (`zeropad-error`) every round. Clients start from the
first r_k rows of A / columns of B of the global factors.

Under partial participation the round's largest rank can be below the global's: rank
components no client of the round trained keep their values (`keep_untrained`), so the
global rank never shrinks and what higher ranks learned stays. A client whose rank exceeds
the global's (its class has not taken part yet) gets the global grown with fresh LoRA
components (`fresh_rows`: new A rows drawn like peft's init, zero B columns).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies.base import ClientIdentity, LoraStrategy
from strategies.lora_math import (
    Factors,
    LoraUpdate,
    fresh_rows,
    join_factors,
    keep_untrained,
    rank_of,
    relative_error,
    split_factors,
    zeropad_factors,
)


class ZeroPad(LoraStrategy):
    name = "zeropad"
    global_mode = "init"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.previous: Factors = {}  # the global the round started from

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.previous = split_factors(arrays.to_torch_state_dict())
        return super().configure_train(server_round, arrays, config, grid)

    def client_state(self, client: ClientIdentity,
                     state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r, scaling = self.rank_for(client), self.client_scaling(client)
        truncated = {m: (a[:r] / scaling, b[:, :r])  # s · B[:, :r] · A[:r] / s
                     for m, (a, b) in split_factors(state).items()}
        if truncated and rank_of(truncated) < r:
            truncated = fresh_rows(truncated, r, self.seed * 1000 + client.partition_id)
        return join_factors(truncated)

    def aggregate_updates(self, server_round: int, updates: list[LoraUpdate]
                          ) -> tuple[ArrayRecord, dict[str, float]]:
        padded = zeropad_factors(updates)
        return ArrayRecord(join_factors(keep_untrained(padded, self.previous))), {
            "zeropad-error": relative_error(padded, updates)}

    def global_adapter(self, arrays: ArrayRecord) -> tuple[dict[str, torch.Tensor], int, float]:
        state = arrays.to_torch_state_dict()
        if not state:
            return {}, 0, 0.0
        rank = rank_of(split_factors(state))
        return state, rank, float(rank)  # scaling folded into A: lora_alpha = r
