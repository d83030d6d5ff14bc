"""FedKSeed (Qin et al., ICML 2024): federated zeroth-order tuning with messages of a few KB.

Every client step is a zeroth-order step along the perturbation of one of K shared seeds
(`strategies.kseed_math` has the math and the choice of what is trained: the LoRA's B, A
fixed from the run's seed, the 4-bit base frozen). The global state is the vector C of K
accumulated scalars, which is also the whole downlink (float64, 8 KB at K = 1024); a client
uploads one (seed index, projected gradient) pair per step (int32 + float32). The server
adds the example-weighted mean of the clients' per-seed sums to C (exact FedAvg of the
clients' states) and rebuilds the LoRA from C to evaluate and export it.

A reply is accepted only with exactly `local_steps` pairs, indices in 0..K-1 and finite
gradients; anything else is rejected with its reason, and C is untouched by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from strategies.base import ClientIdentity, LoraStrategy
from strategies.kseed_math import GRADS, SCALARS, SEEDS, accumulate, adapter_state, seed_sums
from strategies.lora_math import LoraUpdate
from strategies.protocol import ARRAYS, TrainOrder, ZoOrder, alpha_for
from strategies.replies import INDEX_DTYPES, RejectedReply, read_arrays, reply_weight


@dataclass(frozen=True)
class SeedUpdate(LoraUpdate):
    """One client's round as the server aggregates it: its gradients summed per seed."""

    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


class FedKSeed(LoraStrategy):
    name = "fedkseed"

    def __init__(self, *args, seeds: int = 1024, eps: float = 1e-3, zo_lr: float = 1e-3,
                 sampling: str = "uniform", steps: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(set(self.ranks or [])) != 1:
            raise ValueError(f"strategy.ranks={self.ranks}; allowed: a single rank (every "
                             "client perturbs the same LoRA)")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            raise ValueError(f"strategy.steps={steps!r}; allowed: null (train.local_steps) "
                             "or an int >= 1")
        self.rank = self.ranks[0]  # type: ignore[index]
        self.steps = steps
        self.zo = ZoOrder(seeds=seeds, eps=eps, lr=zo_lr, sampling=sampling,
                          run_seed=self.seed)  # validates K, eps, lr and the sampling
        self.scalars = torch.zeros(seeds, dtype=torch.float64)

    def order_steps(self) -> int:
        """Zeroth-order steps cost two forward passes and no backward: a run compares them
        with gradient steps at equal client time by setting `strategy.steps`."""
        return self.steps or self.local_steps

    def order_for(self, server_round: int, client: ClientIdentity) -> TrainOrder:
        return self.make_order(server_round, self.rank, train_lora_a=False, zo=self.zo)

    def global_scalars(self, arrays: ArrayRecord) -> torch.Tensor:
        state = arrays.to_torch_state_dict()
        if SCALARS not in state:
            return torch.zeros(self.zo.seeds, dtype=torch.float64)
        return state[SCALARS].double()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        self.scalars = self.global_scalars(arrays)  # what this round's replies add to
        return list(super().configure_train(server_round, arrays, config, grid))

    def downlink(self, server_round: int, client: ClientIdentity, state: dict[str, torch.Tensor],
                 order: TrainOrder) -> tuple[ArrayRecord, ConfigRecord | None]:
        return ArrayRecord({SCALARS: self.scalars}), None  # float64: replayed exactly

    def parse_update(self, content: RecordDict, order: TrainOrder) -> LoraUpdate:
        weight = reply_weight(content)
        steps = (order.local_steps,)
        pairs = read_arrays(content.array_records[ARRAYS], {SEEDS: steps, GRADS: steps},
                            "seed/gradient pairs",
                            {SEEDS: INDEX_DTYPES, GRADS: ("float32", "float64")})
        indices = pairs[SEEDS].long()
        bad = indices[(indices < 0) | (indices >= self.zo.seeds)]
        if bad.numel():
            raise RejectedReply(f"seed index {int(bad[0])} out of range; allowed: 0.."
                                f"{self.zo.seeds - 1} (strategy.seeds={self.zo.seeds})")
        return SeedUpdate(factors={}, scaling=order.scaling, weight=weight,
                          sums=seed_sums(indices, pairs[GRADS], self.zo.seeds))

    def aggregate_updates(self, server_round: int, updates: list[LoraUpdate]
                          ) -> tuple[ArrayRecord, dict[str, float]]:
        sums = [(u.weight, u.sums) for u in updates if isinstance(u, SeedUpdate)]
        self.scalars = accumulate(self.scalars, sums)
        return ArrayRecord({SCALARS: self.scalars}), {
            "seeds-touched": float(torch.count_nonzero(self.scalars))}

    def load_state(self, state: dict, arrays: ArrayRecord) -> None:
        self.scalars = self.global_scalars(arrays)

    def global_adapter(self, arrays: ArrayRecord) -> tuple[dict[str, torch.Tensor], int, float]:
        scalars = self.global_scalars(arrays)
        if not torch.count_nonzero(scalars):
            return {}, 0, 0.0
        state = adapter_state(self.module_shapes, self.rank, self.zo.run_seed, scalars,
                              self.zo.lr)
        return state, self.rank, alpha_for(self.rank, self.alpha_ratio)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t├──> fedkseed: K=%d seeds (%s), eps=%g, zeroth-order lr=%g, %d steps",
            self.zo.seeds, self.zo.sampling, self.zo.eps, self.zo.lr, self.order_steps())
