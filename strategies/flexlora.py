"""FlexLoRA: the dense weighted sum of the clients' adapters, SVD-truncated back to each
client's rank when sent.

The server keeps the global update G = Σ p_k s_k B_k A_k as low-rank factors (exact up to
`rank_budget`); client k starts its next round from the best rank-r_k approximation of G
(Eckart–Young, `lora_math.factors_for_client`) and returns its whole adapter, which replaces G.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from strategies.base import ClientIdentity
from strategies.flora import FLoRA
from strategies.lora_math import (
    LoraUpdate,
    factors_for_client,
    join_factors,
    rank_of,
    split_factors,
    stack_factors,
    truncate_factors,
)


class FlexLoRA(FLoRA):
    name = "flexlora"
    cappable = False  # clients hold a rank-r truncation of G
    global_mode = "init"
    supports_dp = False  # the dense sum replaces G: FLoRA's private stacking does not apply

    def client_state(self, client: ClientIdentity,
                     state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return join_factors(factors_for_client(split_factors(state), self.rank_for(client),
                                               self.client_scaling(client)))

    def aggregate_updates(self, server_round: int, updates: list[LoraUpdate]
                          ) -> tuple[ArrayRecord, dict[str, float]]:
        self.global_factors, dropped = truncate_factors(stack_factors(updates), self.rank_budget)
        return ArrayRecord(join_factors(self.global_factors)), {
            "global-rank": float(rank_of(self.global_factors)), "svd-dropped-error": dropped}
