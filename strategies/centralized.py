"""The centralized upper bound: one LoRA trained on the pooled data of every client.

Not a federated method but the reference a federated one is measured against: what the same
model, LoRA, batch, learning rate and total number of steps reach when nothing stops the data
from being pooled. Each round one client node (any: each holds the same pooled data) trains
the global adapter on the union of all clients' training partitions for as many steps as the
federation trains per round (`local_steps` × the clients a federated round samples); the
server keeps its adapter as the global one and evaluates it exactly as any strategy's.
Training continues from the global A and B each round (like FedIT) with a fresh optimizer,
so a round boundary costs the optimizer's moments and nothing else.
"""

from __future__ import annotations

from strategies.base import ClientIdentity
from strategies.fedit import FedIT
from strategies.protocol import TrainOrder


class Centralized(FedIT):
    name = "centralized"

    def clients_per_round(self) -> int:
        """How many clients a federated round of this scenario trains."""
        n = self.min_available_nodes
        return min(n, max(int(n * self.fraction_train), self.min_train_nodes))

    def order_steps(self) -> int:
        return self.local_steps * self.clients_per_round()

    def sample_size(self, available: int) -> int:
        """One connected client node, drawn by the seed (another one if it has died)."""
        return min(1, available)

    def order_for(self, server_round: int, client: ClientIdentity) -> TrainOrder:
        return self.make_order(server_round, self.rank, pooled=True)
