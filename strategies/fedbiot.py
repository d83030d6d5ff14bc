"""FedBiOT (Wu et al., KDD 2024): federated fine-tuning where the full model never leaves the
server.

The model's top `adapter_layers` decoder layers are the adapter; the layers below are
replaced on devices by an emulator that keeps `emulator_layers` of them (LLM-Drop's most
transforming ones), aligned with the full model on public data by a frozen LoRA E
(`fedapp.server.emulator`, before round 1). A device runs only the emulator and the adapter
(`PipeOrder.layers`: the others are never loaded) and trains a LoRA of rank `rank` on every
target module of the adapter layers, beside a frozen adapter holding E and the global
update G (`biot_math.frozen_adapter`). The server stacks the uploads into G exactly as
FLoRA does (`FedPipe`'s per-module stacking, here every device on the same modules), and
G, on the adapter layers, plugs into the full model: the server evaluates the full model
with G.

Every train message carries E and all of G (no increments: a device holds E ∪ G as one
frozen adapter, each module at its own rank). G covers the adapter layers only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flwr.app import ArrayRecord

from strategies import biot_math
from strategies.base import ClientIdentity
from strategies.fedpipe import FedPipe
from strategies.lora_math import Factors, LoraUpdate, join_factors, split_factors
from strategies.pipe_math import module_order, stack_per_module
from strategies.protocol import PipeOrder, TrainOrder
from strategies.records import is_int, is_number, require


def _positive_int(value: object, key: str) -> int:
    require(is_int(value) and value >= 1, f"strategy.{key}", value, "an integer >= 1")
    return value  # type: ignore[return-value]


class FedBiOT(FedPipe):
    name = "fedbiot"
    increments = False  # devices get E and all of G every round
    emulates = True  # the ServerApp prepares the emulator before round 1
    grid_key = "strategy.rank"

    def __init__(self, *args, adapter_layers: int = 2, emulator_layers: int = 21,
                 rank: int = 8, emulator_rank: int = 8, align_steps: int = 40,
                 align_lr: float = 1e-3, public_examples: int = 32, **kwargs) -> None:
        if is_int(emulator_layers) and emulator_layers < 1:
            raise ValueError(f"strategy.emulator_layers={emulator_layers}: an emulator must "
                             "keep a layer (with zero layers kept nothing stands in for the "
                             "layers below the adapter); allowed: an integer >= 1")
        self.emulator_keep = _positive_int(emulator_layers, "emulator_layers")
        self.adapter_layers = _positive_int(adapter_layers, "adapter_layers")
        self.emulator_rank = _positive_int(emulator_rank, "emulator_rank")
        self.align_steps = _positive_int(align_steps, "align_steps")
        self.public_examples = _positive_int(public_examples, "public_examples")
        require(is_number(align_lr) and align_lr > 0, "strategy.align_lr", align_lr,
                "a number > 0")
        self.align_lr = float(align_lr)
        super().__init__(*args, rank_grid=[_positive_int(rank, "rank")], min_share=0.0,
                         **kwargs)
        if self.module_shapes:  # the model is known: the split must fit its layers
            biot_math.emulator_layers([0.0] * self.num_layers, self.adapter_layers,
                                      self.emulator_keep)
        self.emulator: tuple[int, ...] = ()
        self.emulator_factors: Factors = {}
        self.align_figures: dict[str, float] = {}

    @property
    def num_layers(self) -> int:
        return max(self.layers.values()) + 1

    def set_emulator(self, layers: Sequence[int], factors: Factors,
                     figures: dict[str, float]) -> None:
        """The emulator's layers and its alignment E (scaling-1 factors); from now on orders
        list the ranks of those layers' modules only."""
        self.emulator = tuple(int(i) for i in layers)
        self.emulator_factors = {m: (a.float(), b.float()) for m, (a, b) in factors.items()}
        self.align_figures = dict(figures)
        self.order_keys = module_order({m: s for m, s in self.module_shapes.items()
                                        if self.layers[m] in self.emulator})

    def structure_for(self, client: ClientIdentity) -> dict[str, int]:
        """Every module of the adapter layers at `rank`."""
        return dict.fromkeys(sorted(self.adapter_shapes()), self.grid[-1])

    def order_for(self, server_round: int, client: ClientIdentity) -> TrainOrder:
        if not self.emulator:
            raise RuntimeError("FedBiOT's emulator was never prepared (the ServerApp calls "
                               "fedapp.server.emulator.prepare_emulator before round 1)")
        structure = self.structure_for(client)
        return self.make_order(server_round, self.grid[-1], pipe=PipeOrder(
            ranks=tuple(structure.get(m, 0) for m in self.order_keys), layers=self.emulator))

    def adapter_shapes(self) -> dict[str, tuple[int, int]]:
        top = self.num_layers - self.adapter_layers
        return {m: s for m, s in self.module_shapes.items() if self.layers[m] >= top}

    def round_update(self, server_round: int, updates: list[LoraUpdate]
                     ) -> tuple[Factors, dict[str, float], list[tuple[float, Factors]]]:
        """Δ over the adapter layers only: G never holds the emulator's or other modules."""
        return stack_per_module(updates, self.adapter_shapes()), {}, [
            (u.weight, u.factors) for u in updates]

    def client_state(self, client: ClientIdentity,
                     state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """E and G (its trained modules) as one scaling-1 frozen adapter, each module at its
        own rank."""
        trained = split_factors(super().client_state(client, state)) if state else {}
        return join_factors(biot_math.frozen_adapter(self.emulator_factors, trained))

    def client_arrays(self, client: ClientIdentity,
                      state: dict[str, torch.Tensor]) -> ArrayRecord:
        """E even before G exists (round 1)."""
        dtype = getattr(torch, self.setup.wire_dtype)
        return ArrayRecord({k: v.to(dtype) for k, v in self.client_state(client, state).items()})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "emulator": list(self.emulator),
                "emulator-state": join_factors(self.emulator_factors),
                "align": self.align_figures}

    def load_state(self, state: dict, arrays: ArrayRecord) -> None:
        super().load_state(state, arrays)
        if state.get("emulator"):
            self.set_emulator(state["emulator"], split_factors(state["emulator-state"]),
                              state.get("align", {}))

    def export_metadata(self) -> dict:
        return {**super().export_metadata(), "emulator-layers": list(self.emulator),
                "adapter-layers": self.adapter_layers, **self.align_figures}
