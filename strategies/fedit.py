"""FedIT: FedAvg over the LoRA factors A and B (one rank for all clients).

Clients start each round from the global A and B and train them; the server averages each
factor weighted by `num-examples`. The product of averages is not the average of products:
we log that aggregation noise (`lora_math.fedavg_noise`) every round.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from strategies.base import LoraStrategy
from strategies.lora_math import LoraUpdate, fedavg_factors, fedavg_noise, join_factors
from strategies.protocol import alpha_for


class FedIT(LoraStrategy):
    name = "fedit"
    global_mode = "init"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.ranks is None or len(set(self.ranks)) != 1:
            raise ValueError(f"strategy.ranks={self.ranks}: fedit averages factors of one rank; "
                             "allowed: a single rank (use flora for heterogeneous ranks)")
        self.rank = self.ranks[0]

    def initial_adapter(self) -> tuple[int, float] | None:
        return self.rank, alpha_for(self.rank, self.alpha_ratio)

    def aggregate_updates(self, server_round: int, updates: list[LoraUpdate]
                          ) -> tuple[ArrayRecord, dict[str, float]]:
        averaged = fedavg_factors(updates)
        noise = fedavg_noise(updates)
        return ArrayRecord(join_factors(averaged)), {"aggregation-noise": noise}

    def global_adapter(self, arrays: ArrayRecord) -> tuple[dict[str, torch.Tensor], int, float]:
        return arrays.to_torch_state_dict(), self.rank, alpha_for(self.rank, self.alpha_ratio)
