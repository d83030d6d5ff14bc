"""FFA-LoRA: lora_A frozen at a shared seeded random init, only lora_B trained and averaged.

Because every client multiplies by the same A, averaging B is exact:
(Σ p_k B_k) A = Σ p_k B_k A. Clients upload B only (the A half never leaves the server
after round 1's download).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from strategies.base import ClientIdentity
from strategies.fedit import FedIT
from strategies.lora_math import LoraUpdate, average_b, join_factors, split_factors
from strategies.protocol import TrainOrder
from strategies.replies import parse_reply


class FFALoRA(FedIT):
    name = "ffa"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.frozen_a: dict[str, torch.Tensor] = {}

    def order_for(self, server_round: int, client: ClientIdentity) -> TrainOrder:
        return self.make_order(server_round, self.rank, train_lora_a=False)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        # Clients train against the wire-dtype copy of A: aggregate against that same A.
        dtype = getattr(torch, self.setup.wire_dtype)
        self.frozen_a = {m: a.to(dtype).float()
                         for m, (a, _) in split_factors(arrays.to_torch_state_dict()).items()}
        return list(super().configure_train(server_round, arrays, config, grid))

    def parse_update(self, content: RecordDict, order: TrainOrder) -> LoraUpdate:
        return parse_reply(content, self.module_shapes, order.lora_r, order.scaling,
                           fixed_a=self.frozen_a)

    def aggregate_updates(self, server_round: int, updates: list[LoraUpdate]
                          ) -> tuple[ArrayRecord, dict[str, float]]:
        b_avg = average_b(updates)
        factors = {m: (self.frozen_a[m], b) for m, b in b_avg.items()}
        return ArrayRecord(join_factors(factors)), {}
